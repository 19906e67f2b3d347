"""2-D convolutions of the backbone, and matmuls, with gradients that XLA:CPU runs fast.

The backbone's convolutions are NHWC with HWIO kernels and torchvision's symmetric padding.
On GPU and TPU XLA's convolutions (cuDNN, the MXU) are the fast path: `impl="xla"`. On CPU,
XLA's forward and input-gradient convolutions run near the matmul peak, but its kernel-gradient
convolution runs at 40-50 GFLOP/s against a 340 GFLOP/s matmul on the 2-core box of
docs/benchmarks.md, and autodiff of an N-d `einsum` makes XLA:CPU transpose the output
gradient in memory before the kernel-gradient matmul, which costs more than the matmul.
`impl="matmul"` keeps XLA's forward (so outputs are XLA's convolution, bit for bit, except
1x1) and computes the gradients with 2-D matmuls:

- 1x1 convolutions are `matmul` (after a strided slice for stride 2): forward and both
  gradients are single 2-D matmuls over the flattened [B * H * W, C] activations;
- 3x3 stride-1 convolutions: XLA's input gradient, and the kernel gradient in the Winograd
  F(2x2, 3x3) domain (Lavin & Gray, 2016): 16 matmuls over 2x2 output tiles instead of 36
  multiplications per tile, ~1e-6 relative float32 difference;
- other convolutions (the 7x7 stem, strided or dilated 3x3): XLA's input gradient, the kernel
  gradient by im2col matmuls.

`impl="auto"` picks "matmul" on CPU and "xla" elsewhere. Tests compare every path with XLA's
convolution and its autodiff gradients.
"""

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "matmul")
_DIMS = ("NHWC", "HWIO", "NHWC")


def resolve(impl):
  """The concrete implementation for `impl` on the default backend ("auto" -> per backend)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown convolution implementation {impl!r}; choose from {IMPLEMENTATIONS}")
  if impl == "auto":
    return "matmul" if jax.default_backend() == "cpu" else "xla"
  return impl


def conv2d(x, w, stride=1, dilation=1, impl="auto"):
  """Convolution with symmetric padding `dilation * (k // 2)`, as torchvision's ResNet.

  Args:
    x: [B, H, W, C] input.
    w: [k, k, C, K] kernel (HWIO), k odd.
    stride, dilation: ints, the same along both spatial axes.
    impl: "auto" | "xla" | "matmul" (see the module docstring).

  Returns:
    [B, ceil(H / stride), ceil(W / stride), K] in the dtype of `x` and `w`.
  """
  k = w.shape[0]
  if resolve(impl) == "xla":
    return _xla_conv(x, w, stride, dilation)
  if k == 1:
    if stride > 1:
      x = x[:, ::stride, ::stride]
    return matmul(x, w[0, 0])
  return _conv_matmul_grad(x, w, stride, dilation)


def _xla_conv(x, w, stride, dilation):
  pad = dilation * (w.shape[0] // 2)
  return jax.lax.conv_general_dilated(
    x,
    w,
    (stride, stride),
    ((pad, pad), (pad, pad)),
    rhs_dilation=(dilation, dilation),
    dimension_numbers=_DIMS,
  )


def _dot_2d(a, b, contract):
  """dot_general of 2-D arrays over dims `contract` = (dim of a, dim of b)."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())))


@jax.custom_vjp
def matmul(x, w):
  """x [..., C] @ w [C, K] -> [..., K], with gradients as 2-D matmuls.

  The backward contracts the flattened [N, C] and [N, K] arrays directly; autodiff of the
  N-d `einsum` instead makes XLA:CPU transpose the output gradient in memory first, which
  costs more than the matmul itself (measured: 81 vs 286 GFLOP/s for a 1x1 conv's step).
  """
  return _dot_2d(x.reshape(-1, x.shape[-1]), w, (1, 0)).reshape(*x.shape[:-1], w.shape[-1])


def _matmul_fwd(x, w):
  return matmul(x, w), (x, w)


def _matmul_bwd(residuals, g):
  x, w = residuals
  g2 = g.reshape(-1, g.shape[-1])
  dx = _dot_2d(g2, w, (1, 1)).reshape(x.shape)
  dw = _dot_2d(x.reshape(-1, x.shape[-1]), g2, (0, 0))
  return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for `nn.Dense` (last axis of lhs with axis 0 of rhs) through `matmul`."""
  (lc, rc), batch = dimension_numbers
  if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or any(batch) or rhs.ndim != 2:
    raise ValueError(f"dense_dot_general serves nn.Dense only, got {dimension_numbers}")
  return matmul(lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grad(x, w, stride, dilation):
  """XLA's convolution and input gradient; the kernel gradient by matmuls."""
  return _xla_conv(x, w, stride, dilation)


def _conv_matmul_grad_fwd(x, w, stride, dilation):
  return _xla_conv(x, w, stride, dilation), (x, w)


def _conv_matmul_grad_bwd(stride, dilation, residuals, g):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, stride, dilation), x)
  (dx,) = input_vjp(g)
  k = w.shape[0]
  if k == 3 and stride == 1 and dilation == 1:
    dw = winograd_kernel_gradient(x, g)
  else:
    dw = kernel_gradient(x, g, k, stride, dilation)
  return dx, dw.astype(w.dtype)


_conv_matmul_grad.defvjp(_conv_matmul_grad_fwd, _conv_matmul_grad_bwd)


def kernel_gradient(x, g, k, stride, dilation):
  """Gradient of a convolution's [k, k, C, K] kernel, one im2col matmul per kernel row.

  x: [B, H, W, C] the convolution's input; g: [B, Ho, Wo, K] the gradient of its output.
  Row i of the kernel sees the k column-shifted, strided windows of the padded input; they
  are concatenated along channels into [B * Ho * Wo, k * C] and contracted with `g` over
  the first axis. (One matmul per row measured faster than one per tap or one for all taps.)
  """
  pad = dilation * (k // 2)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  b, ho, wo, kout = g.shape
  c = x.shape[-1]
  g2 = g.reshape(-1, kout)

  def window(i, j):
    start = (0, i * dilation, j * dilation, 0)
    limit = (b, start[1] + stride * (ho - 1) + 1, start[2] + stride * (wo - 1) + 1, c)
    return jax.lax.slice(xp, start, limit, (1, stride, stride, 1))

  rows = []
  for i in range(k):
    patches = jnp.concatenate([window(i, j) for j in range(k)], axis=-1).reshape(-1, k * c)
    rows.append(_dot_2d(patches, g2, (0, 0)).reshape(k, c, kout))
  return jnp.stack(rows)


# Winograd F(2x2, 3x3): y = A^T [(G w G^T) * (B^T d B)] A for each 4x4 input tile d, so the
# kernel gradient is G^T [sum over tiles (B^T d B) * (A dy A^T)] G.
def _strided_taps(x, axis, n):
  """The 4 views x[2i + r] (i < n) along `axis`, r = 0..3: rows of every 4-wide tile."""
  return [jax.lax.slice_in_dim(x, r, r + 2 * (n - 1) + 1, 2, axis) for r in range(4)]


def _input_transform(d0, d1, d2, d3):
  """B^T d along one axis of a 4-tap tile."""
  return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _kernel_transform_t(u0, u1, u2, u3):
  """G^T u along one axis, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]."""
  return u0 + (u1 + u2) * 0.5, (u1 - u2) * 0.5, (u1 + u2) * 0.5 + u3


def _output_transform_t(y0, y1):
  """A y along one axis, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]."""
  return y0, y0 + y1, y0 - y1, -y1


def _tiles(x):
  """B^T d B of every 4x4 tile (stride 2) of x padded by 1: [B, H, W, C] -> [16, T, C]."""
  b, h, wd, c = x.shape
  nh, nw = (h + 1) // 2, (wd + 1) // 2
  xp = jnp.pad(x, ((0, 0), (1, 2 * nh + 1 - h), (1, 2 * nw + 1 - wd), (0, 0)))
  rows = _input_transform(*_strided_taps(xp, 1, nh))  # 4 x [B, nh, W + 2, C]
  v = [t for r in rows for t in _input_transform(*_strided_taps(r, 2, nw))]
  return jnp.stack(v).reshape(16, b * nh * nw, c)


def _output_tiles_t(g):
  """A^T-adjoint of the output gradient per 2x2 tile: [B, H, W, K] -> [16, T, K]."""
  b, h, wd, k = g.shape
  nh, nw = (h + 1) // 2, (wd + 1) // 2
  g = jnp.pad(g, ((0, 0), (0, 2 * nh - h), (0, 2 * nw - wd), (0, 0)))
  g = g.reshape(b, nh, 2, nw, 2, k)
  rows = _output_transform_t(g[:, :, 0], g[:, :, 1])  # 4 x [B, nh, nw, 2, K]
  m = [t for r in rows for t in _output_transform_t(r[..., 0, :], r[..., 1, :])]
  return jnp.stack(m).reshape(16, b * nh * nw, k)


def winograd_kernel_gradient(x, g):
  """Kernel gradient [3, 3, C, K] of a 3x3 stride-1 convolution, in the Winograd domain.

  x: [B, H, W, C] input; g: [B, H, W, K] output gradient. 16 matmuls contract the transformed
  input and output-gradient tiles over the B * H/2 * W/2 tiles, then G^T (.) G maps back.
  """
  v = _tiles(x)  # [16, T, C]
  m = _output_tiles_t(g)  # [16, T, K]
  du = jax.lax.dot_general(v, m, (((1,), (1,)), ((0,), (0,))))  # [16, C, K]
  du = du.reshape(4, 4, *du.shape[1:])
  rows = _kernel_transform_t(*du)  # 3 x [4, C, K]
  return jnp.stack([jnp.stack(_kernel_transform_t(*r)) for r in rows])
