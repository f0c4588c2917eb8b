"""``jaxckpt.compat``: aliases for code written against ``tf.compat``."""

from jaxckpt.compat import v1

__all__ = ("v1",)
