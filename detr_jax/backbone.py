"""ResNet-18/34/50/101 backbone in the torchvision layout (v1.5) with frozen BatchNorm.

Layout follows torchvision so that reference weights map one to one: a 7x7/2 stem conv with
symmetric padding 3, a 3x3/2 max-pool with padding 1, four stages (`layer1`..`layer4`) of
basic or bottleneck blocks whose stride sits in the 3x3 conv (v1.5). Every BatchNorm is frozen
(statistics and affine parameters live in the `batch_stats` collection and never train).
By default only layer4's output is returned: stride 32, or stride 16 with the DC5 dilation;
`return_stages=True` returns every stage's output (the segmentation head's FPN inputs).

Parameter names: `conv1`, `layer{i}_{j}/{conv1,conv2,conv3,downsample_conv}`; frozen BatchNorm
variables `bn1`, `layer{i}_{j}/{bn1,bn2,bn3,downsample_bn}` with `scale, bias, mean, var`.
"""

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax import conv as conv_lib

# (block kind, blocks per stage) for each depth.
RESNET_SPECS = {
  "resnet18": ("basic", (2, 2, 2, 2)),
  "resnet34": ("basic", (3, 4, 6, 3)),
  "resnet50": ("bottleneck", (3, 4, 6, 3)),
  "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
BN_EPS = 1e-5

# torchvision initializes convolutions with kaiming_normal(fan_out, relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def output_channels(backbone):
  """Channels of layer4's output for a backbone name."""
  kind, _ = RESNET_SPECS[backbone]
  return 2048 if kind == "bottleneck" else 512


def stage_channels(backbone):
  """Output channels of layer1..layer4 for a backbone name (256, 512, 1024, 2048 for R50)."""
  kind, _ = RESNET_SPECS[backbone]
  base = (64, 128, 256, 512)
  return tuple(c * (4 if kind == "bottleneck" else 1) for c in base)


def output_stride(dilation):
  """Stride of the returned feature map: 32, or 16 for DC5."""
  return 16 if dilation else 32


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine parameters: `x * scale' + shift'`.

  `scale' = scale * rsqrt(var + 1e-5)`, `shift' = bias - mean * scale'`, exactly as the
  reference's FrozenBatchNorm2d. x: [..., C]. With `calibrate` (applied with
  `mutable=["batch_stats"]`) the mean and variance of `x` over the batch replace the stored
  ones first: a data-dependent initialization for backbones trained without ImageNet weights.
  """

  dtype: jnp.dtype = jnp.float32
  calibrate: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.variable("batch_stats", "scale", jnp.ones, (c,), jnp.float32).value
    bias = self.variable("batch_stats", "bias", jnp.zeros, (c,), jnp.float32).value
    mean_var = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    var_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if self.calibrate:  # data-dependent init: statistics of this batch become the frozen ones
      axes = tuple(range(x.ndim - 1))
      mean_var.value = jnp.mean(x.astype(jnp.float32), axes)
      var_var.value = jnp.var(x.astype(jnp.float32), axes)
    mean, var = mean_var.value, var_var.value
    scale = scale * jax.lax.rsqrt(var + BN_EPS)
    shift = bias - mean * scale
    return x * scale.astype(self.dtype) + shift.astype(self.dtype)


class Conv(nn.Module):
  """k x k conv with torchvision's symmetric padding `dilation * (k // 2)`, bias-free unless
  `bias_init` is given.

  Holds `kernel` [k, k, C, K] (and `bias` [K]) in float32 like `nn.Conv`; computes with
  `conv.conv2d`, whose `impl` picks XLA's convolution or the CPU matmul path.
  x: [B, H, W, C] -> [B, H / stride, W / stride, K].
  """

  features: int
  kernel_size: int
  impl: str  # conv.conv2d's `impl` (config.model.conv)
  stride: int = 1
  dilation: int = 1
  dtype: jnp.dtype = jnp.float32
  forward_only: bool = False  # no gradient flows through it (frozen stage, inference)
  kernel_init: Callable = _conv_init
  bias_init: Callable | None = None

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    w = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    x, w = x.astype(self.dtype), w.astype(self.dtype)
    y = conv_lib.conv2d(x, w, self.stride, self.dilation, self.impl, self.forward_only)
    if self.bias_init is not None:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y


class BasicBlock(nn.Module):
  """ResNet-18/34 block: 3x3 conv (stride) -> 3x3 conv, identity or 1x1 projection shortcut."""

  features: int
  conv: str  # config.model.conv
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: jnp.dtype = jnp.float32
  calibrate: bool = False
  forward_only: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(Conv, dtype=self.dtype, impl=self.conv, forward_only=self.forward_only)
    bn = functools.partial(FrozenBatchNorm, self.dtype, self.calibrate)
    y = nn.relu(bn(name="bn1")(conv(self.features, 3, stride=self.stride, name="conv1")(x)))
    y = bn(name="bn2")(conv(self.features, 3, name="conv2")(y))
    if self.downsample:
      x = conv(self.features, 1, stride=self.stride, name="downsample_conv")(x)
      x = bn(name="downsample_bn")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """ResNet-50/101 block (v1.5): 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels)."""

  features: int
  conv: str  # config.model.conv
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: jnp.dtype = jnp.float32
  calibrate: bool = False
  forward_only: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(Conv, dtype=self.dtype, impl=self.conv, forward_only=self.forward_only)
    bn = functools.partial(FrozenBatchNorm, self.dtype, self.calibrate)
    y = nn.relu(bn(name="bn1")(conv(self.features, 1, name="conv1")(x)))
    y = conv(self.features, 3, stride=self.stride, dilation=self.dilation, name="conv2")(y)
    y = nn.relu(bn(name="bn2")(y))
    y = bn(name="bn3")(conv(self.features * 4, 1, name="conv3")(y))
    if self.downsample:
      x = conv(self.features * 4, 1, stride=self.stride, name="downsample_conv")(x)
      x = bn(name="downsample_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet trunk returning layer4 features (or every stage's with `return_stages`).

  Attributes:
    depth: one of RESNET_SPECS ("resnet50", ...).
    dilation: DC5 -- layer4 uses dilation 2 instead of stride 2 (output stride 16).
    trainable: names from STAGES that receive gradients. Gradients are stopped after the
      last stage of a frozen prefix (stem, layer1 in the reference), so no backward pass
      runs through it.
    dtype: compute dtype.
    calibrate_bn: re-estimate every frozen BatchNorm's statistics from the input batch.
    conv: convolution implementation, see `conv.conv2d` ("auto": per backend).
    return_stages: return a dict of every stage's output instead of layer4's alone.
  """

  depth: str
  dilation: bool
  trainable: Sequence[str]
  dtype: jnp.dtype
  calibrate_bn: bool
  conv: str
  return_stages: bool = False

  @nn.compact
  def __call__(self, x, train=True):
    """x: [B, H, W, 3] normalized images -> [B, H/32, W/32, C] (H/16 for DC5).

    With `return_stages`: a dict `{"layer1": [B, H/4, W/4, C1], "layer2": [B, H/8, W/8, C2],
    "layer3": [B, H/16, W/16, C3], "layer4": [B, H/32, W/32, C4]}` (`stage_channels`; with
    DC5 layer4 is H/16 too). Outputs of frozen stages carry no gradient.

    With `train=False` (no gradient will be taken) every stage runs its fastest forward
    (`conv.conv2d(forward_only=True)`); gradients stay correct either way.
    """
    if self.depth not in RESNET_SPECS:
      raise ValueError(f"Unknown backbone {self.depth!r}; choose from {sorted(RESNET_SPECS)}")
    unknown = set(self.trainable) - set(STAGES)
    if unknown:
      raise ValueError(f"Unknown backbone stages {sorted(unknown)}; choose from {STAGES}")
    kind, blocks = RESNET_SPECS[self.depth]
    block_cls = Bottleneck if kind == "bottleneck" else BasicBlock
    if self.dilation and block_cls is BasicBlock:
      raise ValueError(f"DC5 dilation needs a bottleneck ResNet, not {self.depth}")
    # Stages up to the last one of the frozen prefix run forward only.
    frozen = set()
    for stage in STAGES:
      if stage in self.trainable:
        break
      frozen.add(stage)
    forward_only = frozen if train else set(STAGES)

    def maybe_stop(stage, y):
      return jax.lax.stop_gradient(y) if stage in frozen else y

    x = x.astype(self.dtype)
    x = Conv(
      64, 7, self.conv, 2, dtype=self.dtype, forward_only="stem" in forward_only, name="conv1"
    )(x)
    x = nn.relu(FrozenBatchNorm(self.dtype, self.calibrate_bn, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = maybe_stop("stem", x)
    in_features = 64
    dilation = 1
    stages = {}
    for i, (num_blocks, features) in enumerate(zip(blocks, (64, 128, 256, 512))):
      stride = 1 if i == 0 else 2
      prev_dilation = dilation
      if i == 3 and self.dilation:
        dilation *= stride
        stride = 1
      for j in range(num_blocks):
        downsample = j == 0 and (stride != 1 or in_features != features * block_cls.expansion)
        x = block_cls(
          features,
          stride=stride if j == 0 else 1,
          dilation=prev_dilation if j == 0 else dilation,
          downsample=downsample,
          dtype=self.dtype,
          calibrate=self.calibrate_bn,
          conv=self.conv,
          forward_only=f"layer{i + 1}" in forward_only,
          name=f"layer{i + 1}_{j}",
        )(x)
        in_features = features * block_cls.expansion
      x = maybe_stop(f"layer{i + 1}", x)
      stages[f"layer{i + 1}"] = x
    return stages if self.return_stages else x
