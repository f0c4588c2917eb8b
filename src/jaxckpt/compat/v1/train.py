"""``jaxckpt.compat.v1.train``: ``tf.compat.v1.train.CheckpointOptions``.

Examples:
  >>> import jaxckpt
  >>> jaxckpt.compat.v1.train.CheckpointOptions is jaxckpt.CheckpointOptions
  True
"""

from jaxckpt._options import CheckpointOptions

__all__ = ("CheckpointOptions",)
