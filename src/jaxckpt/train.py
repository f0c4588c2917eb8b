"""``jaxckpt.train``: the names of ``tf.train`` that jaxckpt implements, for ports.

A port can start as an import change: ``tf.train.Checkpoint`` becomes
``jaxckpt.train.Checkpoint``, ``tf.train.CheckpointManager`` becomes
``jaxckpt.train.CheckpointManager``, and so on; each name is the same object
as its top-level ``jaxckpt`` name.

Examples:
  >>> import jaxckpt.train as train, jax.numpy as jnp, tempfile
  >>> d = tempfile.mkdtemp()
  >>> ckpt = train.Checkpoint(step=jnp.array(1))
  >>> manager = train.CheckpointManager(ckpt, d, max_to_keep=3)
  >>> path = manager.save()
  >>> train.latest_checkpoint(d) == path
  True
  >>> train.list_variables(d)
  [('save_counter', []), ('step', [])]
"""

from jaxckpt._checkpoint import Checkpoint
from jaxckpt._manager import CheckpointManager
from jaxckpt._options import CheckpointOptions
from jaxckpt._reader import CheckpointReader
from jaxckpt._reader import list_variables
from jaxckpt._reader import load_checkpoint
from jaxckpt._state_file import CheckpointState
from jaxckpt._state_file import get_checkpoint_state
from jaxckpt._state_file import latest_checkpoint
from jaxckpt._watch import checkpoints_iterator

__all__ = (
  "Checkpoint",
  "CheckpointManager",
  "CheckpointOptions",
  "CheckpointReader",
  "CheckpointState",
  "checkpoints_iterator",
  "get_checkpoint_state",
  "latest_checkpoint",
  "list_variables",
  "load_checkpoint",
)
