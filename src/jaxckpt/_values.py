"""State beyond arrays: Python values and stateful objects, stored exactly in the manifest.

Arrays go to the layout (Orbax's files); everything else a training loop needs
to resume goes into the checkpoint's manifest, which the same atomic commit
writes: ``str``, ``bytes``, numpy string/bytes arrays, ``complex``, ints of any
size, ``None`` and containers of those, and the state of objects that carry
their own state (`get_state()` / `set_state(state)`, as Grain's iterators do;
numpy ``Generator`` through its ``bit_generator.state``).

Values are encoded as tagged JSON, exact for every value: JSON strings,
booleans and null stand for themselves; everything else is a one-key object
(``{"int": "0x1f"}``, ``{"float": "0x1.8p+1"}``, ``{"bytes": base64}``,
``{"dict": [[key, value], ...]}`` ...). Ints are hex strings (no size limit,
and Python's 4300-digit limit on decimal conversion does not apply), floats
``float.hex`` (NaN, infinities and -0.0 exact).
"""

from __future__ import annotations

import base64
from typing import Any

import jax
import numpy as np

from jaxckpt._errors import NotACheckpointError
from jaxckpt._errors import TreeError

# The kinds a manifest records for values (arrays have "jax", "numpy", ...).
VALUE = "value"  # A plain Python value or a non-numeric numpy array.
STATE = "state"  # An object's get_state(), restored by set_state.
GENERATOR = "numpy_generator"  # A numpy Generator's bit_generator.state.

_INT64 = (-(2**63), 2**63 - 1)


def is_plain_value(value: Any) -> bool:
  """Whether ``value`` is a leaf stored in the manifest rather than as an array."""
  if isinstance(value, bool):
    return False
  if isinstance(value, int):
    return not _INT64[0] <= value <= _INT64[1]
  if isinstance(value, (np.ndarray, np.generic)):
    return value.dtype.kind in "USO"
  return isinstance(value, (str, bytes, complex)) or value is None


def stateful_kind(value: Any) -> str | None:
  """``STATE`` or ``GENERATOR`` for objects restored in place, else None."""
  if isinstance(value, np.random.Generator):
    return GENERATOR
  if callable(getattr(value, "get_state", None)) and callable(getattr(value, "set_state", None)):
    return STATE
  return None


def get_state(value: Any, kind: str) -> Any:
  """The state to store of a stateful object (see `stateful_kind`)."""
  if kind == GENERATOR:
    return value.bit_generator.state
  return value.get_state()


def set_state(obj: Any, kind: str, state: Any) -> None:
  """Puts ``state`` back into ``obj`` in place."""
  if kind == GENERATOR:
    obj.bit_generator.state = state
  else:
    obj.set_state(state)


def _array(value: np.ndarray, name: str) -> dict[str, Any]:
  if value.dtype.kind == "O":
    raise TreeError(
      f"Value '{name}' is a numpy array of dtype object; store a string ('U'/'S') "
      "or numeric array instead."
    )
  dtype = value.dtype.str if value.dtype.kind != "V" else value.dtype.name
  data = base64.b64encode(np.ascontiguousarray(value).tobytes()).decode()
  return {"dtype": dtype, "shape": list(value.shape), "data": data}


def encode(value: Any, name: str) -> Any:
  """``value`` as tagged JSON (see the module docstring).

  Raises:
    TreeError: ``value`` (or something inside it) has no exact encoding; the
      message names ``name`` and the type.
  """
  if isinstance(value, np.ndarray):
    return {"ndarray": _array(value, name)}
  if isinstance(value, np.generic):  # Before str: np.str_ is a str.
    return {"npscalar": _array(np.asarray(value), name)}
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, int):
    return {"int": hex(value)}
  if isinstance(value, float):
    return {"float": value.hex()}
  if isinstance(value, complex):
    return {"complex": [value.real.hex(), value.imag.hex()]}
  if isinstance(value, bytes):
    return {"bytes": base64.b64encode(value).decode()}
  if isinstance(value, list):
    return {"list": [encode(v, name) for v in value]}
  if isinstance(value, tuple):
    return {"tuple": [encode(v, name) for v in value]}
  if isinstance(value, dict):
    return {"dict": [[encode(k, name), encode(v, name)] for k, v in value.items()]}
  raise TreeError(
    f"Value '{name}' holds a {type(value).__module__}.{type(value).__qualname__}, "
    "which has no exact encoding; state values may be None, bool, int, float, "
    "complex, str, bytes, numpy arrays, and lists, tuples and dicts of those."
  )


def _decode_array(spec: dict[str, Any]) -> np.ndarray:
  dtype = np.dtype(jax.numpy.dtype(spec["dtype"]) if spec["dtype"] == "bfloat16" else spec["dtype"])
  data = base64.b64decode(spec["data"])
  return np.frombuffer(data, dtype=dtype).reshape(spec["shape"]).copy()


_DECODERS: dict[str, Any] = {
  "int": lambda v: int(v, 16),
  "float": float.fromhex,
  "complex": lambda v: complex(float.fromhex(v[0]), float.fromhex(v[1])),
  "bytes": base64.b64decode,
  "list": lambda v: [decode(x) for x in v],
  "tuple": lambda v: tuple(decode(x) for x in v),
  "dict": lambda v: {decode(k): decode(x) for k, x in v},
  "ndarray": _decode_array,
  "npscalar": lambda v: _decode_array(v)[()],
}


def decode(data: Any) -> Any:
  """The value `encode` encoded.

  Raises:
    NotACheckpointError, ValueError, KeyError, TypeError: ``data`` is not tagged
      JSON (the manifest reader reports all of them as a damaged manifest).
  """
  if data is None or isinstance(data, (bool, str)):
    return data
  if not isinstance(data, dict) or len(data) != 1:
    raise NotACheckpointError(f"not a tagged value: {str(data)[:80]}")
  ((tag, payload),) = data.items()
  return _DECODERS[tag](payload)


def shape_of(value: Any) -> tuple[int, ...]:
  """The shape `list_variables` shows for a value: a numpy array's, else ()."""
  return tuple(value.shape) if isinstance(value, np.ndarray) else ()
