"""jaxckpt: TF's ``tf.train.Checkpoint`` semantics for JAX, on Orbax and TensorStore."""

from jaxckpt._checkpoint import Checkpoint
from jaxckpt._errors import (
    CheckpointNotFoundError,
    InvalidOptionsError,
    JaxckptError,
    LoadStatusError,
    NotACheckpointError,
    SaveError,
    ShapeMismatchError,
    TreeError,
    UnknownDeviceError,
    WriteCallbackError,
)
from jaxckpt._future import CommitFuture, SavePath
from jaxckpt._load_status import LoadStatus
from jaxckpt._manager import CheckpointManager
from jaxckpt._options import CheckpointOptions
from jaxckpt._reader import CheckpointReader, VariableNotFoundError, list_variables, load_checkpoint
from jaxckpt._state_file import latest_checkpoint

__version__ = "0.1.0"

__all__ = (
    "Checkpoint",
    "CheckpointNotFoundError",
    "CheckpointManager",
    "CheckpointOptions",
    "CheckpointReader",
    "CommitFuture",
    "InvalidOptionsError",
    "JaxckptError",
    "LoadStatus",
    "LoadStatusError",
    "NotACheckpointError",
    "SaveError",
    "SavePath",
    "ShapeMismatchError",
    "TreeError",
    "UnknownDeviceError",
    "VariableNotFoundError",
    "WriteCallbackError",
    "latest_checkpoint",
    "list_variables",
    "load_checkpoint",
)
