"""jaxckpt: TF's ``tf.train.Checkpoint`` semantics for JAX, on Orbax and TensorStore."""

from jaxckpt import compat  # noqa: E402 - After the names its modules import.
from jaxckpt import train  # noqa: E402
from jaxckpt._checkpoint import Checkpoint
from jaxckpt._errors import CheckpointDeletedError
from jaxckpt._errors import CheckpointNotFoundError
from jaxckpt._errors import ConcurrentWriterError
from jaxckpt._errors import CoordinationError
from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import DtypeMismatchError
from jaxckpt._errors import InvalidCallbackError
from jaxckpt._errors import InvalidOptionsError
from jaxckpt._errors import InvalidPathError
from jaxckpt._errors import JaxckptError
from jaxckpt._errors import LoadStatusError
from jaxckpt._errors import NotACheckpointError
from jaxckpt._errors import PathExistsError
from jaxckpt._errors import SaveError
from jaxckpt._errors import ShapeMismatchError
from jaxckpt._errors import TreeError
from jaxckpt._errors import UnknownDeviceError
from jaxckpt._errors import UnknownItemError
from jaxckpt._errors import UnsupportedTensorError
from jaxckpt._errors import VariableNotFoundError
from jaxckpt._errors import WriteCallbackError
from jaxckpt._future import CommitFuture
from jaxckpt._future import SavePath
from jaxckpt._load_status import LoadStatus
from jaxckpt._manager import CheckpointManager
from jaxckpt._options import CheckpointOptions
from jaxckpt._preemption import install_preemption_handler
from jaxckpt._reader import CheckpointReader
from jaxckpt._reader import list_variables
from jaxckpt._reader import load_checkpoint
from jaxckpt._state_file import get_checkpoint_state
from jaxckpt._state_file import latest_checkpoint
from jaxckpt._watch import checkpoints_iterator

__version__ = "0.1.0"

__all__ = (
  "Checkpoint",
  "CheckpointDeletedError",
  "CheckpointNotFoundError",
  "ConcurrentWriterError",
  "CheckpointManager",
  "CheckpointOptions",
  "CheckpointReader",
  "CorruptCheckpointError",
  "CommitFuture",
  "CoordinationError",
  "DtypeMismatchError",
  "InvalidCallbackError",
  "InvalidOptionsError",
  "InvalidPathError",
  "JaxckptError",
  "LoadStatus",
  "LoadStatusError",
  "NotACheckpointError",
  "PathExistsError",
  "SaveError",
  "SavePath",
  "ShapeMismatchError",
  "TreeError",
  "UnknownDeviceError",
  "UnknownItemError",
  "UnsupportedTensorError",
  "VariableNotFoundError",
  "WriteCallbackError",
  "checkpoints_iterator",
  "compat",
  "get_checkpoint_state",
  "install_preemption_handler",
  "latest_checkpoint",
  "list_variables",
  "load_checkpoint",
  "train",
)
