import copy
import inspect
import warnings

import pytest

import jaxckpt
from jaxckpt._options import call_write_callback


def test_signature_is_tfs_in_tfs_order():
  params = list(inspect.signature(jaxckpt.CheckpointOptions).parameters)
  assert params[:4] == [
    "experimental_io_device",
    "experimental_enable_async_checkpoint",
    "experimental_write_callbacks",
    "enable_async",
  ]
  positional = jaxckpt.CheckpointOptions("cpu:0", False, None, True)
  assert positional.experimental_io_device == "cpu:0"
  assert positional.enable_async


def test_defaults():
  opts = jaxckpt.CheckpointOptions()
  assert opts.experimental_io_device is None
  assert opts.enable_async is False
  assert opts.experimental_enable_async_checkpoint is False
  assert opts.experimental_write_callbacks is None


@pytest.mark.parametrize(
  "alias, flag, expected",
  [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
def test_async_flags_are_or_merged(alias, flag, expected):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    opts = jaxckpt.CheckpointOptions(experimental_enable_async_checkpoint=alias, enable_async=flag)
  assert opts.enable_async is expected
  assert opts.experimental_enable_async_checkpoint is expected


def test_deprecated_alias_warns_pointing_at_caller():
  with pytest.warns(DeprecationWarning, match="use enable_async") as record:
    jaxckpt.CheckpointOptions(experimental_enable_async_checkpoint=True)
  assert record[0].filename == __file__


def test_enable_async_alone_does_not_warn():
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jaxckpt.CheckpointOptions(enable_async=True)
  assert caught == []


def test_setting_either_flag_after_construction_keeps_both_in_sync():
  opts = jaxckpt.CheckpointOptions()
  opts.enable_async = True
  assert opts.experimental_enable_async_checkpoint is True
  with pytest.warns(DeprecationWarning):
    opts.experimental_enable_async_checkpoint = False
  assert opts.enable_async is False


def test_setting_enable_async_after_construction_takes_effect(tmp_path):
  import jax.numpy as jnp

  seen = []
  opts = jaxckpt.CheckpointOptions(
    experimental_write_callbacks=[
      lambda: seen.append(__import__("threading").current_thread().name)
    ]
  )
  opts.enable_async = True
  path = jaxckpt.Checkpoint(x=jnp.ones(2)).save(tmp_path / "c", options=opts)
  path.future.result(timeout=60)
  assert seen and seen[0].startswith("jaxckpt-save")


def test_callback_not_callable_is_named():
  with pytest.raises(jaxckpt.InvalidOptionsError, match=r"experimental_write_callbacks\[1\]"):
    jaxckpt.CheckpointOptions(experimental_write_callbacks=[print, "oops"])


def test_callback_with_two_required_params_is_rejected():
  def two(a, b):
    pass

  with pytest.raises(ValueError, match=r"\[0\].*two.*at most one positional"):
    jaxckpt.CheckpointOptions(experimental_write_callbacks=[two])


def test_callback_with_required_keyword_only_is_rejected():
  def kw(*, must):
    pass

  with pytest.raises(TypeError, match="must"):
    jaxckpt.CheckpointOptions(experimental_write_callbacks=[kw])


def test_single_callable_instead_of_list_is_rejected():
  with pytest.raises(jaxckpt.InvalidOptionsError, match="list of callables"):
    jaxckpt.CheckpointOptions(experimental_write_callbacks=print)


def test_accepted_callback_shapes_and_how_they_are_called():
  calls = []

  def no_arg():
    calls.append("none")

  def one_arg(path):
    calls.append(("one", path))

  def defaulted(path, extra=1):
    calls.append(("defaulted", path, extra))

  def star(*args):
    calls.append(("star", args))

  opts = jaxckpt.CheckpointOptions(experimental_write_callbacks=[no_arg, one_arg, defaulted, star])
  for cb in opts.experimental_write_callbacks:
    call_write_callback(cb, "/p-1")
  assert calls == ["none", ("one", "/p-1"), ("defaulted", "/p-1", 1), ("star", ("/p-1",))]


def test_copies_have_their_own_callback_list():
  opts = jaxckpt.CheckpointOptions(experimental_write_callbacks=[print])
  for clone in (copy.copy(opts), copy.deepcopy(opts), opts.copy()):
    assert clone == opts
    clone.experimental_write_callbacks.append(len)
    assert opts.experimental_write_callbacks == [print]
    assert clone.experimental_write_callbacks[0] is print


def test_equality_and_repr():
  a = jaxckpt.CheckpointOptions("cpu:0", enable_async=True)
  b = jaxckpt.CheckpointOptions("cpu:0", enable_async=True)
  assert a == b
  b.enable_async = False
  assert a != b
  assert repr(a) == (
    "CheckpointOptions(experimental_io_device='cpu:0', enable_async=True, "
    "experimental_write_callbacks=None)"
  )


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1"])
def test_keep_staging_bytes_is_a_non_negative_int(bad):
  with pytest.raises(jaxckpt.InvalidOptionsError, match=f"keep_staging_bytes.*got {bad!r}"):
    jaxckpt.CheckpointOptions(keep_staging_bytes=bad)
  opts = jaxckpt.CheckpointOptions(keep_staging_bytes=1 << 30)
  assert opts.keep_staging_bytes == opts.copy().keep_staging_bytes == 1 << 30
  assert "keep_staging_bytes=1073741824" in repr(opts)
  assert opts != jaxckpt.CheckpointOptions() and "keep_staging" not in repr(
    jaxckpt.CheckpointOptions()
  )
