"""Flax NNX objects and linen TrainState pytrees, with real optax optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from flax import nnx
from flax.training import train_state

import jaxckpt


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(8, 32, rngs=rngs)
    self.bn = nnx.BatchNorm(32, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.l2 = nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def _data(i):
  x = jax.random.normal(jax.random.key(100 + i), (16, 8))
  return x, jnp.sum(x, axis=1, keepdims=True)


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  def loss_fn(m):
    return jnp.mean((m(x) - y) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _make(seed):
  model = MLP(nnx.Rngs(seed, dropout=seed + 1))
  return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def test_nnx_model_and_optimizer_resume_exactly(tmp_path):
  model, optimizer = _make(0)
  for i in range(5):
    _nnx_step(model, optimizer, *_data(i))
  ckpt = jaxckpt.Checkpoint(model=model, optimizer=optimizer)
  path = ckpt.save(tmp_path / "ckpt", options=jaxckpt.CheckpointOptions(enable_async=True))
  expected = [float(_nnx_step(model, optimizer, *_data(i))) for i in range(5, 10)]
  ckpt.sync()

  fresh_model, fresh_opt = _make(42)  # Different init, different RNG streams.
  fresh = jaxckpt.Checkpoint(model=fresh_model, optimizer=fresh_opt)
  fresh.restore(path).assert_consumed()
  assert fresh.model is fresh_model  # Restored in place, like TF variables.
  got = [float(_nnx_step(fresh_model, fresh_opt, *_data(i))) for i in range(5, 10)]
  assert got == expected  # Dropout keys, BatchNorm stats and Adam moments all restored.


def test_nnx_names_and_load_status(tmp_path):
  model, optimizer = _make(0)
  path = jaxckpt.Checkpoint(model=model).save(tmp_path / "ckpt")
  names = dict(jaxckpt.list_variables(path))
  assert names["model/l1/kernel"] == [8, 32]
  assert "model/drop/rngs/key" in names and "model/bn/mean" in names
  status = jaxckpt.Checkpoint(model=_make(1)[0], optimizer=optimizer).restore(path)
  with pytest.raises(AssertionError, match="optimizer/opt_state"):
    status.assert_existing_objects_matched()
  status.assert_nontrivial_match()


def test_abstract_nnx_model_restores_without_random_init(tmp_path):
  model, _ = _make(0)
  model.eval()
  x, _ = _data(0)
  path = jaxckpt.Checkpoint(model=model).save(tmp_path / "ckpt")
  abstract = nnx.eval_shape(lambda: MLP(nnx.Rngs(0, dropout=1)))
  assert isinstance(nnx.state(abstract)["l1"]["kernel"].get_value(), jax.ShapeDtypeStruct)
  ckpt = jaxckpt.Checkpoint(model=abstract)
  with pytest.raises(jaxckpt.TreeError, match="abstract"):
    ckpt.save(tmp_path / "nope")
  ckpt.restore(path).assert_consumed()
  abstract.eval()
  np.testing.assert_array_equal(abstract(x), model(x))


class LinenMLP(linen.Module):
  @linen.compact
  def __call__(self, x):
    return linen.Dense(1)(linen.relu(linen.Dense(32)(x)))


@jax.jit
def _linen_step(state, x, y):
  def loss_fn(params):
    return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def _train_state(seed):
  module = LinenMLP()
  params = module.init(jax.random.key(seed), jnp.ones((1, 8)))["params"]
  return train_state.TrainState.create(apply_fn=module.apply, params=params, tx=optax.adamw(1e-2))


def test_linen_train_state_resumes_exactly(tmp_path):
  state = _train_state(0)
  for i in range(4):
    state, _ = _linen_step(state, *_data(i))
  ckpt = jaxckpt.Checkpoint(state=state)
  path = ckpt.save(tmp_path / "ckpt")
  expected = []
  for i in range(4, 8):
    state, loss = _linen_step(state, *_data(i))
    expected.append(float(loss))
  fresh = jaxckpt.Checkpoint(state=_train_state(7))
  fresh.restore(path).assert_consumed()
  restored = fresh.state
  assert int(restored.step) == 4
  got = []
  for i in range(4, 8):
    restored, loss = _linen_step(restored, *_data(i))
    got.append(float(loss))
  assert got == expected
