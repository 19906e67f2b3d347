"""detr_jax/transformer.py pieces not covered by the parity test (which runs deterministic)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  assert abs(np.mean(z[..., 0:-1:2] & z[..., 1::2]) - 0.01) < 0.001
  assert abs(np.mean(z[:, :-1] & z[:, 1:]) - 0.01) < 0.001
  assert abs(np.mean(z[:-1] & z[1:]) - 0.01) < 0.001


def test_dropout_bits_are_uniform_and_independent_across_keys():
  shape = (1000, 1000)
  a = np.asarray(transformer.dropout_bits(jax.random.key(0), shape))
  b = np.asarray(transformer.dropout_bits(jax.random.key(1), shape))
  assert a.dtype == np.uint32
  for words in (a, b):
    bit_means = ((words[..., None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=(0, 1))
    assert np.all(np.abs(bit_means - 0.5) < 0.003), bit_means  # sd 0.0005 per bit
    halves = np.stack([words & 0xFFFF, words >> 16]) / 65536.0
    assert np.all(np.abs(halves.mean(axis=(1, 2)) - 0.5) < 0.002)
    np.testing.assert_allclose(
      np.histogram(halves, bins=16, range=(0, 1))[0] / halves.size, 1 / 16, atol=0.001
    )
  # Two keys (two dropout layers) give uncorrelated streams, also element by element.
  assert abs(np.corrcoef(a.ravel() / 2.0**32, b.ravel() / 2.0**32)[0, 1]) < 0.005
  assert abs(np.mean((a < 2**31) & (b < 2**31)) - 0.25) < 0.003


def test_dropout_edge_rates():
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(_drop(x, 0.1, deterministic=True), x)
  np.testing.assert_array_equal(_drop(x, 0.0), x)
  np.testing.assert_array_equal(_drop(x, 1.0), jnp.zeros_like(x))


def test_attention_implementation_per_backend():
  pick = transformer.attention_implementation
  assert pick("auto", jnp.bfloat16, backend="gpu") == "cudnn"
  assert pick("auto", jnp.float32, backend="gpu") == "xla"  # cuDNN has no float32 kernel
  assert pick("auto", jnp.bfloat16, backend="cpu") == "xla"
  assert pick("auto", jnp.bfloat16, backend="tpu") == "xla"
  assert pick("cudnn", jnp.float32, backend="cpu") == "cudnn"  # explicit choice is kept
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
    pick("flash", jnp.float32)
