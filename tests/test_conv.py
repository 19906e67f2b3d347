"""detr_jax/conv.py against XLA's convolution and autodiff (the oracle for every path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax import backbone, conv


def _xla_conv_and_grads(x, w, stride, dilation, g):
  y, vjp = jax.vjp(lambda x, w: conv._xla_conv(x, w, stride, dilation), x, w)
  return (y, *vjp(g))


def _rel_err(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize(
  "k, stride, dilation, h, w",
  [
    (1, 1, 1, 8, 6),
    (1, 2, 1, 8, 6),
    (1, 2, 1, 7, 5),  # odd sizes: ceil(H / 2) outputs
    (3, 1, 1, 8, 6),  # Winograd
    (3, 1, 1, 7, 5),  # Winograd with partial edge tiles
    (3, 2, 1, 8, 6),  # im2col kernel gradient
    (3, 1, 2, 8, 8),  # DC5 dilation
    (7, 2, 1, 10, 12),  # stem
  ],
)
def test_matmul_path_matches_xla_values_and_gradients(k, stride, dilation, h, w):
  kx, kw, kg = jax.random.split(jax.random.key(k * 100 + stride * 10 + h), 3)
  x = jax.random.normal(kx, (2, h, w, 5))
  kernel = jax.random.normal(kw, (k, k, 5, 7))
  g = jax.random.normal(kg, conv._xla_conv(x, kernel, stride, dilation).shape)
  y_ref, dx_ref, dw_ref = _xla_conv_and_grads(x, kernel, stride, dilation, g)

  f = jax.jit(lambda x, w: conv.conv2d(x, w, stride, dilation, "matmul"))
  y, vjp = jax.vjp(f, x, kernel)
  dx, dw = vjp(g)
  assert y.shape == y_ref.shape == (2, -(-h // stride), -(-w // stride), 7)
  assert _rel_err(y, y_ref) < 1e-5
  assert _rel_err(dx, dx_ref) < 1e-5
  assert _rel_err(dw, dw_ref) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "matmul"])
@pytest.mark.parametrize(
  "k, stride, dilation, h, w",
  [(3, 1, 1, 2, 3), (3, 2, 1, 2, 2), (3, 1, 2, 1, 8), (7, 2, 1, 4, 6)],
)
def test_maps_smaller_than_the_kernel_are_one_matmul(impl, k, stride, dilation, h, w):
  """XLA would swap such a convolution's operands (a naive loop on CPU): conv2d computes it by
  im2col, with XLA's values and gradients, and no swapped convolution is compiled."""
  kx, kw, kg = jax.random.split(jax.random.key(h * 10 + w), 3)
  x = jax.random.normal(kx, (2, h, w, 5))
  kernel = jax.random.normal(kw, (k, k, 5, 7))
  assert conv._swapped_by_xla_cpu(x, kernel)
  g = jax.random.normal(kg, conv._xla_conv(x, kernel, stride, dilation).shape)
  y_ref, dx_ref, dw_ref = _xla_conv_and_grads(x, kernel, stride, dilation, g)
  f = jax.jit(lambda x, w: conv.conv2d(x, w, stride, dilation, impl))
  y, vjp = jax.vjp(f, x, kernel)
  for got, ref in zip((y, *vjp(g)), (y_ref, dx_ref, dw_ref)):
    assert got.shape == ref.shape and _rel_err(got, ref) < 1e-5
  for forward_only in (False, True):
    hlo = jax.jit(lambda x, w, f=forward_only: conv.conv2d(x, w, stride, dilation, impl, f))
    assert "convolution(" not in hlo.lower(x, kernel).compile().as_text()


def test_winograd_conv3x3_direct():
  x = jax.random.normal(jax.random.key(0), (3, 9, 4, 6))
  w = jax.random.normal(jax.random.key(1), (3, 3, 6, 2))
  np.testing.assert_allclose(
    conv.winograd_conv3x3(x, w), conv._xla_conv(x, w, 1, 1), rtol=1e-5, atol=1e-5
  )


def test_forward_only_uses_xla_convolution():
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))
  expected = conv._xla_conv(x, w, 1, 1)
  np.testing.assert_array_equal(conv.conv2d(x, w, 1, 1, "matmul", forward_only=True), expected)
  w1 = w[1:2, 1:2]
  np.testing.assert_array_equal(
    conv.conv2d(x, w1, 1, 1, "matmul", forward_only=True), conv._xla_conv(x, w1, 1, 1)
  )
  assert not np.array_equal(conv.conv2d(x, w, 1, 1, "matmul"), expected)  # Winograd rounding


@pytest.mark.parametrize(
  "fn, spec, x_shape, w_shape",
  [
    (conv.matmul, "...c,ck->...k", (2, 3, 4, 5), (5, 6)),
    (conv.batched_matmul, "tnc,tck->tnk", (4, 5, 6), (4, 6, 3)),
  ],
)
def test_matmul_gradients_match_einsum_autodiff(fn, spec, x_shape, w_shape):
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), w_shape)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  ours = jax.grad(loss(fn), argnums=(0, 1))(x, w)
  ref = jax.grad(loss(lambda x, w: jnp.einsum(spec, x, w)), argnums=(0, 1))(x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dense_dot_general_only_serves_dense():
  x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
  assert conv.dense_dot_general(x, w, (((2,), (0,)), ((), ()))).shape == (2, 3, 5)
  with pytest.raises(ValueError, match="nn.Dense only"):
    conv.dense_dot_general(x, w.T, (((2,), (1,)), ((), ())))


def test_bfloat16_keeps_dtype():
  x = jnp.ones((1, 4, 4, 3), jnp.bfloat16)
  for k, stride in ((1, 1), (3, 1), (3, 2)):
    w = jnp.ones((k, k, 3, 2), jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, w, s=stride: conv.conv2d(x, w, s, 1, "matmul"), x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16


def test_resolve():
  assert conv.resolve("xla") == "xla"
  assert conv.resolve("auto") == ("matmul" if jax.default_backend() == "cpu" else "xla")
  with pytest.raises(ValueError, match="Unknown convolution implementation 'cudnn'"):
    conv.resolve("cudnn")


def test_resnet_gradients_equal_across_implementations():
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  models = {
    impl: backbone.ResNet(
      "resnet18", False, ("layer2", "layer3", "layer4"), jnp.float32, False, conv=impl
    )
    for impl in ("xla", "matmul")
  }
  variables = models["xla"].init(jax.random.key(1), x)

  def grads(model):
    f = lambda p: jnp.mean(model.apply({**variables, "params": p}, x) ** 2)
    return jax.jit(jax.value_and_grad(f))(variables["params"])

  (loss_x, g_x), (loss_m, g_m) = grads(models["xla"]), grads(models["matmul"])
  np.testing.assert_allclose(loss_m, loss_x, rtol=1e-5)
  flat_x = jax.tree_util.tree_leaves_with_path(g_x)
  flat_m = jax.tree.leaves(g_m)
  for (path, a), b in zip(flat_x, flat_m):
    scale = float(jnp.abs(a).max())
    if "layer1" in jax.tree_util.keystr(path) or path[0].key == "conv1":
      assert scale == 0.0 and float(jnp.abs(b).max()) == 0.0  # frozen prefix: no gradient
    else:
      assert scale > 0
      np.testing.assert_allclose(b, a, atol=1e-4 * scale)
