"""2-D convolutions of the backbone, and matmuls, in forms that XLA:CPU runs fast.

The backbone's convolutions are NHWC with HWIO kernels and torchvision's symmetric padding.
On GPU and TPU XLA's convolutions (cuDNN, the MXU) are the fast path: `impl="xla"`. On CPU,
XLA's forward and input-gradient convolutions run near the matmul peak, but its kernel-gradient
convolution runs at 40-50 GFLOP/s against a 340 GFLOP/s matmul on the 2-core box of
docs/benchmarks.md, and autodiff of an N-d `einsum` makes XLA:CPU transpose the output
gradient in memory before the kernel-gradient matmul, which costs more than the matmul.
`impl="matmul"` routes the work to 2-D (and batched) matmuls:

- 1x1 convolutions are `matmul` (after a strided slice for stride 2): forward and both
  gradients are single 2-D matmuls over the flattened [B * H * W, C] activations;
- 3x3 stride-1 convolutions use Winograd F(2x2, 3x3) (Lavin & Gray, 2016): 16 batched
  matmuls per 2x2 output tile instead of 36 multiplications, in the forward and, through
  autodiff of the transforms, in both gradients; float32 results differ from direct
  convolution by ~1e-6 relative;
- other convolutions (the 7x7 stem, strided or dilated 3x3) keep XLA's forward and input
  gradient and compute their kernel gradient with im2col matmuls (`custom_vjp`);
- with `forward_only` (frozen stages, through which no gradient flows, and inference) every
  convolution is XLA's, the fastest forward once `runtime.compiler_options()` fuses its
  epilogue.

Whatever `impl`, on CPU a convolution whose input map has fewer positions than its kernel has
taps (layer4 of a small image) is one im2col matmul: XLA would swap its operands into a form
XLA:CPU runs as a naive loop (`_swapped_by_xla_cpu`).

`impl="auto"` picks "matmul" on CPU and "xla" elsewhere. Tests compare every path with XLA's
convolution and its autodiff gradients. On a 2-core CPU this took the DETR-R50 backbone's
forward + backward at 512 x 512, batch 2, from 3.1 s to 0.9 s.

`dot_general_for(impl)` gives the transformer's `nn.Dense` layers the same choice: with
"matmul" their gradients are 2-D matmuls too (`matmul`), with "xla" they are XLA's own.
The XLA:CPU option that fuses element-wise epilogues (frozen BatchNorm, ReLU, bias) into these
matmuls lives in `detr_jax/runtime.py` (`compiler_options`).
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


def conv2d(x, w, stride, dilation, impl, forward_only=False):
  """Convolution with symmetric padding `dilation * (k // 2)`, as torchvision's ResNet.

  Args:
    x: [B, H, W, C] input.
    w: [k, k, C, K] kernel (HWIO), k odd.
    stride, dilation: ints, the same along both spatial axes.
    impl: "auto" | "xla" | "matmul" (see the module docstring).
    forward_only: no gradient will be taken through this call (a frozen stage, or
      inference): use the fastest forward, XLA's convolution.

  Returns:
    [B, ceil(H / stride), ceil(W / stride), K] in the dtype of `x` and `w`.
  """
  k = w.shape[0]
  if k > 1 and _swapped_by_xla_cpu(x, w):
    return _im2col_conv(x, w, stride, dilation)
  if resolve(impl) == "xla" or forward_only:
    return _xla_conv(x, w, stride, dilation)
  if k == 1:
    if stride > 1:
      x = x[:, ::stride, ::stride]
    return matmul(x, w[0, 0])
  if k == 3 and stride == 1 and dilation == 1:
    return winograd_conv3x3(x, w)
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


def _swapped_by_xla_cpu(x, w):
  """Whether XLA:CPU would run this convolution slowly: its algebraic simplifier swaps the
  operands of a convolution whose input map has fewer positions than the kernel has taps
  (H * W < k * k, e.g. layer4 of a ResNet on a 64 x 96 image: 2 x 3 against 3 x 3), and the
  swapped convolution runs as a naive loop, 6-12x slower (docs/benchmarks.md, "Test suite")."""
  return jax.default_backend() == "cpu" and x.shape[1] * x.shape[2] < w.shape[0] * w.shape[1]


def _windows(x, k, stride, dilation, out_hw):
  """The k * k strided windows of the symmetrically padded `x` [B, H, W, C], one per kernel
  tap (row-major), each [B, Ho, Wo, C] with (Ho, Wo) = `out_hw`."""
  pad = dilation * (k // 2)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  b, c = x.shape[0], x.shape[-1]
  ho, wo = out_hw
  out = []
  for i in range(k):
    for j in range(k):
      start = (0, i * dilation, j * dilation, 0)
      limit = (b, start[1] + stride * (ho - 1) + 1, start[2] + stride * (wo - 1) + 1, c)
      out.append(jax.lax.slice(xp, start, limit, (1, stride, stride, 1)))
  return out


def _im2col_conv(x, w, stride, dilation):
  """The convolution as one matmul of the concatenated windows [B, Ho, Wo, k * k * C] with
  the kernel [k * k * C, K]; for maps smaller than the kernel (`_swapped_by_xla_cpu`)."""
  k, _, c, kout = w.shape
  out_hw = (-(-x.shape[1] // stride), -(-x.shape[2] // stride))
  patches = jnp.concatenate(_windows(x, k, stride, dilation, out_hw), axis=-1)
  return matmul(patches, w.reshape(k * k * c, kout))


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
  """`lax.dot_general` for `nn.Dense` (last axis of lhs with axis 0 of rhs) through `matmul`.

  A call that asks for a `precision` or `preferred_element_type` goes to `lax.dot_general`
  unchanged (the custom-gradient `matmul` has neither).
  """
  (lc, rc), batch = dimension_numbers
  if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or any(batch) or rhs.ndim != 2:
    raise ValueError(f"dense_dot_general serves nn.Dense only, got {dimension_numbers}")
  if precision is not None or preferred_element_type is not None:
    return jax.lax.dot_general(
      lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type
    )
  return matmul(lhs, rhs)


def dot_general_for(impl):
  """The `dot_general` for `nn.Dense` layers under convolution implementation `impl`:
  `dense_dot_general` where `impl` resolves to "matmul", else `lax.dot_general`."""
  return dense_dot_general if resolve(impl) == "matmul" else jax.lax.dot_general


def _bdot(a, b, contract):
  """dot_general of [T, ., .] arrays batched over axis 0, contracting dims `contract`."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))))


@jax.custom_vjp
def batched_matmul(v, u):
  """v [T, N, C] @ u [T, C, K] -> [T, N, K], gradients as batched matmuls (see `matmul`)."""
  return _bdot(v, u, (2, 1))


def _batched_matmul_fwd(v, u):
  return batched_matmul(v, u), (v, u)


def _batched_matmul_bwd(residuals, g):
  v, u = residuals
  return _bdot(g, u, (2, 2)), _bdot(v, g, (1, 1))


batched_matmul.defvjp(_batched_matmul_fwd, _batched_matmul_bwd)


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
  return dx, kernel_gradient(x, g, w.shape[0], stride, dilation).astype(w.dtype)


_conv_matmul_grad.defvjp(_conv_matmul_grad_fwd, _conv_matmul_grad_bwd)


def kernel_gradient(x, g, k, stride, dilation):
  """Gradient of a convolution's [k, k, C, K] kernel, one im2col matmul per kernel row.

  x: [B, H, W, C] the convolution's input; g: [B, Ho, Wo, K] the gradient of its output.
  Row i of the kernel sees the k column-shifted, strided windows of the padded input; they
  are concatenated along channels into [B * Ho * Wo, k * C] and contracted with `g` over
  the first axis. (One matmul per row measured faster than one per tap or one for all taps.)
  """
  _, ho, wo, kout = g.shape
  c = x.shape[-1]
  g2 = g.reshape(-1, kout)
  windows = _windows(x, k, stride, dilation, (ho, wo))
  rows = []
  for i in range(k):
    patches = jnp.concatenate(windows[i * k : (i + 1) * k], axis=-1).reshape(-1, k * c)
    rows.append(_dot_2d(patches, g2, (0, 0)).reshape(k, c, kout))
  return jnp.stack(rows)


# Winograd F(2x2, 3x3): y = A^T [(G w G^T) * (B^T d B)] A for each 4x4 input tile d (stride 2).
def _tile_taps(x, axis, n):
  """The 4 views x[2i + r] (i < n) along `axis`, r = 0..3: rows of every 4-wide tile.

  `x` has 2n + 2 entries along `axis`; viewed as (n + 1) pairs, the taps are contiguous
  slices of the even and odd entries (cheaper, also in the backward, than stride-2 slices).
  """
  y = x.reshape(*x.shape[:axis], n + 1, 2, *x.shape[axis + 1 :])
  first, second = (jax.lax.slice_in_dim(y, s, s + n, axis=axis) for s in (0, 1))
  pick = lambda a, parity: jax.lax.index_in_dim(a, parity, axis + 1, keepdims=False)
  return [pick(first, 0), pick(first, 1), pick(second, 0), pick(second, 1)]


def _input_transform(d0, d1, d2, d3):
  """B^T d along one axis of a 4-tap tile."""
  return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _kernel_transform(g0, g1, g2):
  """G g along one axis of a 3-tap kernel."""
  return g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2


def _output_transform(m0, m1, m2, m3):
  """A^T m along one axis of a 4-tap tile."""
  return m0 + m1 + m2, m1 - m2 - m3


def winograd_conv3x3(x, w):
  """3x3 stride-1 convolution with padding 1 by Winograd F(2x2, 3x3).

  The input's 4x4 tiles and the kernel are transformed (additions only), 16 batched matmuls
  over the [B * H/2 * W/2] tiles replace 36 multiplications per 2x2 output tile, and the
  output transform adds them back up. The gradients are autodiff's: the adjoint transforms
  and the batched matmuls of `batched_matmul`, so the input and kernel gradients get the same
  2.25x saving. Odd H or W are padded to whole tiles and cropped back.

  Args:
    x: [B, H, W, C]; w: [3, 3, C, K].

  Returns:
    [B, H, W, K].
  """
  b, h, wd, c = x.shape
  k = w.shape[-1]
  nh, nw = (h + 1) // 2, (wd + 1) // 2
  xp = jnp.pad(x, ((0, 0), (1, 2 * nh + 1 - h), (1, 2 * nw + 1 - wd), (0, 0)))
  rows = _input_transform(*_tile_taps(xp, 1, nh))  # 4 x [B, nh, W + 2, C]
  v = [t for r in rows for t in _input_transform(*_tile_taps(r, 2, nw))]
  v = jnp.stack(v).reshape(16, b * nh * nw, c)
  u = jnp.stack([t for r in _kernel_transform(*w) for t in _kernel_transform(*r)])  # [16, C, K]
  m = batched_matmul(v, u).reshape(4, 4, b, nh, nw, k)
  rows = _output_transform(*m)  # 2 x [4, B, nh, nw, K]
  y = [jnp.stack(_output_transform(*r), axis=-2) for r in rows]  # 2 x [B, nh, nw, 2, K]
  y = jnp.stack(y, axis=2).reshape(b, 2 * nh, 2 * nw, k)
  return y[:, :h, :wd]
