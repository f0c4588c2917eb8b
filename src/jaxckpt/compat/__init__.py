"""``jaxckpt.compat``: aliases for code written against ``tf.compat``.

Examples:
  >>> import jaxckpt
  >>> jaxckpt.compat.v1.train.CheckpointOptions is jaxckpt.CheckpointOptions
  True
"""

from jaxckpt.compat import v1

__all__ = ("v1",)
