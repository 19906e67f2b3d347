"""DETR's segmentation head (the reference's DETRsegm) and torch-exact image resizing.

`config.model.masks = True` puts two modules on top of the box model (`models.DETR`):

- `MHAttentionMap` (`bbox_attention`): each query of the last decoder layer attends over the
  encoder memory; the result is not multiplied by values but returned as maps, one per head.
  The softmax runs jointly over heads and positions (the reference flattens both).
- `MaskHead` (`mask_head`, the reference's MaskHeadSmallConv): 3x3 convolutions with
  GroupNorm and ReLU from the projected res5 features and the attention maps at stride 32 up
  to stride 4, FPN-style: at each of res4, res3, res2 the 1x1-adapted backbone features are
  added to the nearest-upsampled running features.

Every query gets its own mask, so the head runs on [B * Q, ...] activations. The reference
repeats the projected features and each FPN level Q times and concatenates/adds them to the
per-query maps; this one never materializes those repeats. Convolution is linear, so
`conv(cat(src, maps)) = conv_src(src) + conv_maps(maps)` and `conv(fpn + up(x)) = conv(fpn) +
conv(up(x))`: the image-level parts (`src`, the adapted FPN features, and the conv bias) are
convolved once per image and broadcast over the queries, and only the per-query part is
convolved per query: 8 input channels instead of D + 8 in the first layer (at D = 256, 1024 x
1024, Q = 100 that is 4 instead of 128 GFLOP per image). A 3x3 convolution of a 2x
nearest-upsampled input is computed on the low-resolution input with four phase kernels
(`conv3x3_of_upsampled`), so the upsampled per-query input is not materialized either. What
stays per query is unavoidable: each GroupNorm normalizes one query's feature map, so the
convolution outputs at strides 16, 8 and 4 exist per query ([B * Q, H/4, W/4, D/16] at the
last stage). GroupNorm + ReLU normalize in the compute dtype (statistics in float32) and are
rematerialized in the backward pass, so it keeps those outputs in bfloat16 under
`model.dtype="bfloat16"` and no float32 copies (docs/benchmarks.md: the memory plans).

Parameter names follow the reference state dict: `bbox_attention/{q_linear,k_linear}`,
`mask_head/{lay1..lay5, gn1..gn5, adapter1..adapter3, out_lay}`.

`resize_nearest` and `resize_bilinear` reproduce `torch.nn.functional.interpolate` (modes
"nearest" and "bilinear" with align_corners=False) for the static shapes used here.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax import conv as conv_lib
from detr_jax import resize

GN_EPS = 1e-5  # torch.nn.GroupNorm's default
GN_GROUPS = 8  # the reference's GroupNorm(8, C)

# The reference initializes the mask head's convolutions with kaiming_uniform_(a=1), bias 0:
# U(-sqrt(3 / fan_in), sqrt(3 / fan_in)).
_kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def mask_head_channels(hidden_dim, num_heads):
  """Output channels of lay1..lay5: (D + heads, D/2, D/4, D/8, D/16)."""
  d = hidden_dim
  return (d + num_heads, d // 2, d // 4, d // 8, d // 16)


def group_count(channels):
  """GroupNorm groups for `channels`: 8 as the reference; fewer channels than 8 (tiny models,
  where the reference cannot run) get one group per channel, as `transformers` does."""
  return min(GN_GROUPS, channels)


def check_mask_head_sizes(hidden_dim, num_heads):
  """Raises a ValueError naming the config fields when the mask head's GroupNorms do not fit."""
  for c in mask_head_channels(hidden_dim, num_heads):
    if c < 1 or c % group_count(c):
      raise ValueError(
        f"config.model.masks=True needs hidden_dim + num_heads and hidden_dim / 2, / 4, / 8, "
        f"/ 16 divisible by {GN_GROUPS} (or smaller than it): hidden_dim={hidden_dim}, "
        f"num_heads={num_heads} give mask-head channels {mask_head_channels(hidden_dim, num_heads)}"
      )


# ---- Resizing with torch's index rules --------------------------------------------------------


def resize_nearest(x, size):
  """x: [N, h, w, C] -> [N, H, W, C], `F.interpolate(mode="nearest", size=(H, W))` (NHWC)."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  x = jnp.take(x, resize.nearest_index(h, size[0]), axis=1)
  return jnp.take(x, resize.nearest_index(w, size[1]), axis=2)


def resize_bilinear(x, size):
  """x: [..., h, w] -> [..., H, W]: `F.interpolate(mode="bilinear", align_corners=False)`
  (no antialiasing, unlike `jax.image.resize`). Two static gathers and a lerp per axis;
  equal sizes return `x` unchanged."""
  h, w = x.shape[-2:]
  if (h, w) == tuple(size):
    return x
  i0, i1, w0, w1 = resize.bilinear_taps(h, size[0])
  x = jnp.take(x, i0, axis=-2) * w0[:, None] + jnp.take(x, i1, axis=-2) * w1[:, None]
  i0, i1, w0, w1 = resize.bilinear_taps(w, size[1])
  return jnp.take(x, i0, axis=-1) * w0 + jnp.take(x, i1, axis=-1) * w1


# ---- Convolutions of upsampled inputs ---------------------------------------------------------


def _phases(w, axis):
  """The two 3-tap kernels along `axis` that a 3x3 convolution of a 2x nearest-upsampled
  input applies to the low-resolution input: output 2i reads upsampled rows 2i - 1, 2i,
  2i + 1 = low rows i - 1, i, i (taps [w0, w1 + w2, 0]); output 2i + 1 reads low rows i, i,
  i + 1 (taps [0, w0 + w1, w2]). Slices and sums only (no constant matrices for XLA to fold)."""
  t0, t1, t2 = (jax.lax.index_in_dim(w, i, axis, keepdims=False) for i in range(3))
  zero = jnp.zeros_like(t0)
  return jnp.stack([t0, t1 + t2, zero], axis), jnp.stack([zero, t0 + t1, t2], axis)


def conv3x3_of_upsampled(x, w, impl, forward_only):
  """`conv2d(resize_nearest(x, 2x), w)` without materializing the upsampled input.

  The four output phases (row and column parity) are 3x3 convolutions of `x` itself with
  kernels built from `w` (`_phases`), stacked along the output channels and interleaved back
  (a depth-to-space). Same FLOPs as the direct convolution on the upsampled input; the
  result differs from it only by float summation order.

  Args:
    x: [N, h, w, C]; w: [3, 3, C, K] (HWIO).
    impl, forward_only: `conv.conv2d`'s.

  Returns:
    [N, 2h, 2w, K].
  """
  n, h, wd, _ = x.shape
  k = w.shape[-1]
  rows = [_phases(r, 1) for r in _phases(w, 0)]  # [a][b]: [3, 3, C, K]
  phases = jnp.stack([jnp.stack(cols, axis=-2) for cols in rows], axis=-3)  # [3, 3, C, 2, 2, K]
  phases = phases.reshape(3, 3, w.shape[2], 4 * k)
  y = conv_lib.conv2d(x, phases, 1, 1, impl, forward_only)  # [N, h, w, 4K]
  y = y.reshape(n, h, wd, 2, 2, k).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(n, 2 * h, 2 * wd, k)


# ---- Modules ----------------------------------------------------------------------------------


class ConvWeights(nn.Module):
  """The kernel [k, k, C, K] (HWIO) and bias [K] of one convolution, float32, reference init."""

  shape: Sequence[int]

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", _kaiming_uniform_a1, tuple(self.shape), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.shape[-1],), jnp.float32)
    return kernel, bias


class GroupNormReLU(nn.Module):
  """torch.nn.GroupNorm over [N, H, W, C] (statistics per sample and group accumulated in
  float32; biased variance, eps 1e-5), `scale` and `bias` per channel, then ReLU; in `dtype`.

  Used under `nn.remat` (`GroupNormReLURemat`): the backward pass keeps only the input (in
  `dtype`) and recomputes the statistics, instead of keeping float32 intermediates of the
  size of the per-query activations."""

  num_groups: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xg = x.astype(self.dtype).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
    axes = (1, 2, 4)
    # Statistics accumulate in float32; the normalization itself runs in `dtype`, so that no
    # float32 tensor of the activations' size exists (forward or backward) with bfloat16.
    mean = jnp.mean(xg, axes, dtype=jnp.float32, keepdims=True)
    var = jnp.mean(jnp.square(xg.astype(jnp.float32) - mean), axes, keepdims=True)
    y = (xg - mean.astype(self.dtype)) * jax.lax.rsqrt(var + GN_EPS).astype(self.dtype)
    y = y.reshape(x.shape) * scale.astype(self.dtype) + bias.astype(self.dtype)
    return nn.relu(y)


GroupNormReLURemat = nn.remat(GroupNormReLU)


class MHAttentionMap(nn.Module):
  """Attention maps of queries over the memory: softmax(q k^T / sqrt(D / heads)) per query,
  jointly over heads and positions, without values (the reference's MHAttentionMap, dropout 0).

  q_linear and k_linear: D -> D with xavier-uniform kernels and zero biases.
  """

  num_heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, queries, memory):
    """queries [B, Q, D], memory [B, h, w, D] -> maps [B, Q, h, w, heads] float32."""
    b, q, d = queries.shape
    _, h, w, _ = memory.shape
    dense = lambda name: nn.Dense(
      d,
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name=name,
    )
    head_dim = d // self.num_heads
    qh = dense("q_linear")(queries).reshape(b, q, self.num_heads, head_dim)
    kh = dense("k_linear")(memory).reshape(b, h * w, self.num_heads, head_dim)
    qh = qh * jnp.asarray(head_dim**-0.5, qh.dtype)
    logits = jnp.einsum("bqnc,bknc->bqkn", qh, kh, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits.reshape(b, q, -1), axis=-1)
    return probs.reshape(b, q, h, w, self.num_heads)


class MaskHead(nn.Module):
  """The reference's MaskHeadSmallConv: per-query mask logits at the resolution of res2.

  lay1 (3x3, D + heads) -> gn1 -> ReLU -> lay2 (D/2) -> gn2 -> ReLU; then for each of res4,
  res3, res2: `adapter_i(res) + nearest_upsample(x)` -> lay (D/4, D/8, D/16) -> gn -> ReLU;
  out_lay (3x3, 1 channel). See the module docstring for how the image-level parts are kept
  out of the per-query tensors.

  Attributes:
    conv: `config.model.conv` (`conv.conv2d`'s impl).
    dtype: compute dtype of the activations (GroupNorm statistics are float32 always).
  """

  conv: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, src, maps, fpns, train):
    """Mask logits of every query.

    Args:
      src: [B, h, w, D] the projected res5 features (`input_proj`'s output).
      maps: [B, Q, h, w, heads] `MHAttentionMap`'s output.
      fpns: (res4, res3, res2) backbone stage outputs, [B, H_i, W_i, C_i], coarse to fine.
      train: gradients will be taken (picks the convolutions built for them on CPU).

    Returns:
      [B, Q, H2, W2] float32 logits at res2's resolution (H/4, W/4).
    """
    b, q, h, w, heads = maps.shape
    d = src.shape[-1]
    dims = mask_head_channels(d, heads)
    dt = self.dtype
    fwd = not train

    def conv(x, kernel, bias=None):
      y = conv_lib.conv2d(x.astype(dt), kernel.astype(dt), 1, 1, self.conv, fwd)
      return y if bias is None else y + bias.astype(dt)

    def per_query(y_image, y_query):
      """[B, H, W, K] + [B * Q, H, W, K] -> [B * Q, H, W, K] (broadcast over queries)."""
      y = y_query.reshape(b, q, *y_query.shape[1:]) + y_image[:, None]
      return y.reshape(b * q, *y.shape[2:])

    def norm_relu(x, i):
      return GroupNormReLURemat(group_count(x.shape[-1]), dt, name=f"gn{i}")(x)

    kernel, bias = ConvWeights((3, 3, d + heads, dims[0]), name="lay1")()
    x = per_query(
      conv(src, kernel[:, :, :d], bias),  # the image part, once per image
      conv(maps.reshape(b * q, h, w, heads), kernel[:, :, d:]),
    )
    x = norm_relu(x, 1)
    kernel, bias = ConvWeights((3, 3, dims[0], dims[1]), name="lay2")()
    x = norm_relu(conv(x, kernel, bias), 2)
    for i, fpn in enumerate(fpns):
      kernel, bias = ConvWeights((1, 1, fpn.shape[-1], dims[i + 1]), name=f"adapter{i + 1}")()
      adapted = conv(fpn, kernel, bias)  # [B, H', W', C], once per image
      kernel, bias = ConvWeights((3, 3, dims[i + 1], dims[i + 2]), name=f"lay{i + 3}")()
      # lay(adapted + up(x)) = lay(adapted) (per image, with the bias) + lay(up(x)) (per query)
      size = fpn.shape[1:3]
      if size == x.shape[1:3]:
        y = conv(x, kernel)
      elif size == (2 * x.shape[1], 2 * x.shape[2]):
        y = conv3x3_of_upsampled(x.astype(dt), kernel.astype(dt), self.conv, fwd)
      else:
        y = conv(resize_nearest(x, size), kernel)
      x = norm_relu(per_query(conv(adapted, kernel, bias), y), i + 3)
    kernel, bias = ConvWeights((3, 3, dims[-1], 1), name="out_lay")()
    out = conv(x, kernel, bias).astype(jnp.float32)
    return out.reshape(b, q, *out.shape[1:3])
