"""``jaxckpt.compat.v1``: the ``tf.compat.v1`` names jaxckpt implements."""

from jaxckpt.compat.v1 import train

__all__ = ("train",)
