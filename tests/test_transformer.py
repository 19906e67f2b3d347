"""detr_jax/transformer.py pieces not covered by the parity test (which runs deterministic)."""

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import transformer


def _drop(x, rate, deterministic=False, seed=0):
  return transformer.Dropout(rate).apply(
    {}, x, deterministic, rngs={"dropout": jax.random.key(seed)}
  )


def test_dropout_rate_scale_and_determinism():
  x = jnp.ones((4, 257, 301))  # odd last axis: the unpaired element gets its own bits
  y = _drop(x, 0.1)
  dropped = float(jnp.mean(y == 0))
  # 465,028 Bernoulli(0.100006) draws: standard deviation 0.00044.
  assert abs(dropped - 0.1) < 0.003
  kept = np.unique(np.asarray(y[y != 0]))
  np.testing.assert_allclose(kept, [65536 / 58982], rtol=1e-7)
  assert abs(float(y.mean()) - 1.0) < 0.01  # expectation preserved
  np.testing.assert_array_equal(y, _drop(x, 0.1))  # same rng, same mask
  assert not np.array_equal(y, _drop(x, 0.1, seed=1))
  # Masks are not correlated along the paired last axis or across rows.
  z = np.asarray(y == 0)
  assert abs(np.mean(z[..., 0:-1:2] & z[..., 1::2]) - 0.01) < 0.002
  assert abs(np.mean(z[:, 0] & z[:, 1]) - 0.01) < 0.002


def test_dropout_edge_rates():
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(_drop(x, 0.1, deterministic=True), x)
  np.testing.assert_array_equal(_drop(x, 0.0), x)
  np.testing.assert_array_equal(_drop(x, 1.0), jnp.zeros_like(x))
