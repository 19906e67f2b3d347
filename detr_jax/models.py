"""The DETR model: backbone -> input projection -> transformer -> class and box heads, and with
`config.model.masks` the reference's segmentation head (`detr_jax/segmentation.py`)."""

from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax import backbone as backbone_lib
from detr_jax import conv as conv_lib
from detr_jax import position, segmentation, transformer

# Top-level parameter modules of the segmentation head (DETRsegm's `bbox_attention.*` and
# `mask_head.*`); everything else is the box model (DETRsegm's `detr.*`).
MASK_HEAD_MODULES = ("bbox_attention", "mask_head")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _torch_linear_init(fan_in):
  """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class BoxHead(nn.Module):
  """The 3-layer box MLP (D -> D -> D -> 4, ReLU between) with sigmoid: [..., D] -> [..., 4]."""

  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    for i, n in enumerate((d, d, 4)):
      init = _torch_linear_init(d)
      x = nn.Dense(
        n,
        kernel_init=init,
        bias_init=init,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=f"layers_{i}",
      )(x)
      if i < 2:
        x = nn.relu(x)
    return jax.nn.sigmoid(x.astype(jnp.float32))


class DETR(nn.Module):
  """DETR. Attributes mirror the `config.model` fields (see configs/base.py)."""

  num_classes: int
  num_queries: int
  hidden_dim: int
  num_heads: int
  num_encoder_layers: int
  num_decoder_layers: int
  dim_feedforward: int
  dropout: float
  pre_norm: bool
  backbone: str
  dilation: bool
  backbone_trainable: Sequence[str]
  attention: str
  conv: str
  remat: bool
  dtype: jnp.dtype
  masks: bool
  train_only_mask_head: bool
  calibrate_bn: bool = False  # see calibrate_batch_norm

  @nn.compact
  def __call__(self, images, train=False):
    """Detects objects.

    Args:
      images: [B, H, W, 3] float32, ImageNet-normalized; H and W divisible by the stride.
      train: enables dropout (needs a `dropout` rng) and, on CPU, the backbone convolutions
        built for gradients (`conv.conv2d`); False runs the fastest forward.

    Returns:
      dict with `pred_logits` [B, Q, K+1] (last = no object), `pred_boxes` [B, Q, 4]
      (normalized cxcywh), `aux_outputs`: list of such dicts for decoder layers 0..L-2.
      With `masks`, also `pred_masks` [B, Q, H/4, W/4]: mask logits of the last decoder
      layer's queries. Logits, boxes and masks are float32 whatever the compute dtype.
      With `train_only_mask_head` no gradient reaches the box model (it runs forward only).
    """
    frozen_box_model = self.masks and self.train_only_mask_head
    stages = backbone_lib.ResNet(
      self.backbone,
      self.dilation,
      () if frozen_box_model else tuple(self.backbone_trainable),
      self.dtype,
      self.calibrate_bn,
      self.conv,
      return_stages=self.masks,
      name="backbone",
    )(images, train)
    feats = stages["layer4"] if self.masks else stages
    in_ch = feats.shape[-1]
    init = _torch_linear_init(in_ch)
    x = backbone_lib.Conv(
      self.hidden_dim,
      1,
      self.conv,
      kernel_init=init,
      bias_init=init,
      dtype=self.dtype,
      name="input_proj",
    )(feats)
    b, h, w, d = x.shape
    pos = jnp.asarray(position.sine_position_embedding(h, w, d // 2))
    query_embed = self.param(
      "query_embed", nn.initializers.normal(1.0), (self.num_queries, d), jnp.float32
    )
    out = transformer.Transformer(
      num_heads=self.num_heads,
      num_encoder_layers=self.num_encoder_layers,
      num_decoder_layers=self.num_decoder_layers,
      dim_feedforward=self.dim_feedforward,
      dropout=self.dropout,
      pre_norm=self.pre_norm,
      attention=self.attention,
      conv=self.conv,
      remat=self.remat,
      dtype=self.dtype,
      return_memory=self.masks,
      name="transformer",
    )(x.reshape(b, h * w, d), pos, query_embed, deterministic=not train)
    hs, memory = out if self.masks else (out, None)
    if frozen_box_model:
      hs, memory, x = jax.lax.stop_gradient((hs, memory, x))
    init = _torch_linear_init(d)
    logits = nn.Dense(
      self.num_classes + 1,
      kernel_init=init,
      bias_init=init,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="class_embed",
    )(hs).astype(jnp.float32)
    boxes = BoxHead(self.dtype, name="bbox_embed")(hs)
    if frozen_box_model:
      logits, boxes = jax.lax.stop_gradient((logits, boxes))
    outputs = {
      "pred_logits": logits[-1],
      "pred_boxes": boxes[-1],
      "aux_outputs": [
        {"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(len(hs) - 1)
      ],
    }
    if self.masks:
      maps = segmentation.MHAttentionMap(self.num_heads, self.dtype, name="bbox_attention")(
        hs[-1], memory.reshape(b, h, w, d)
      )
      outputs["pred_masks"] = segmentation.MaskHead(self.conv, self.dtype, name="mask_head")(
        x, maps, (stages["layer3"], stages["layer2"], stages["layer1"]), train
      )
    return outputs


def build_model(model_config):
  """DETR module from a `config.model` ConfigDict (the one place these fields are read)."""
  c = model_config
  if c.dtype not in _DTYPES:
    raise ValueError(f"config.model.dtype={c.dtype!r}; choose from {sorted(_DTYPES)}")
  conv_lib.resolve(c.conv)  # fail early on unknown implementation names
  transformer.attention_implementation(c.attention, _DTYPES[c.dtype])
  if c.hidden_dim % c.num_heads:
    raise ValueError(f"config.model.hidden_dim={c.hidden_dim} not divisible by num_heads")
  if c.hidden_dim % 4:
    raise ValueError(f"config.model.hidden_dim={c.hidden_dim} must be divisible by 4")
  if c.masks:
    segmentation.check_mask_head_sizes(c.hidden_dim, c.num_heads)
  elif c.train_only_mask_head:
    raise ValueError("config.model.train_only_mask_head=True needs config.model.masks=True")
  return DETR(
    num_classes=c.num_classes,
    num_queries=c.num_queries,
    hidden_dim=c.hidden_dim,
    num_heads=c.num_heads,
    num_encoder_layers=c.num_encoder_layers,
    num_decoder_layers=c.num_decoder_layers,
    dim_feedforward=c.dim_feedforward,
    dropout=c.dropout,
    pre_norm=c.pre_norm,
    backbone=c.backbone,
    dilation=c.dilation,
    backbone_trainable=tuple(c.backbone_trainable),
    attention=c.attention,
    conv=c.conv,
    remat=c.remat,
    dtype=_DTYPES[c.dtype],
    masks=c.masks,
    train_only_mask_head=c.train_only_mask_head,
  )


def init_variables(model, rng, image_size, batch_size=1):
  """Variables `{"params", "batch_stats"}` for images of `image_size` (H, W)."""
  images = jnp.zeros((batch_size, *image_size, 3), jnp.float32)
  variables = model.init(rng, images, train=False)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def abstract_variables(model):
  """`init_variables`' pytree as `jax.ShapeDtypeStruct`s, computed without running anything.

  The variables' shapes do not depend on the image size (the position embedding is a
  constant of the feature grid), so the smallest valid size is used.
  """
  side = 2 * backbone_lib.output_stride(model.dilation)
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (side, side)))


def calibrate_batch_norm(model, variables, images):
  """Frozen BatchNorm statistics estimated from `images` [B, H, W, 3] (data-dependent init).

  For backbones trained from scratch (no ImageNet weights): each frozen BatchNorm's mean and
  variance become those of its input on this batch, layer after layer, so activations start
  standardized everywhere instead of growing through the residual stages. Returns new
  variables; params are unchanged.
  """
  _, updates = model.clone(calibrate_bn=True).apply(
    variables, images, train=False, mutable=["batch_stats"]
  )
  return {**variables, "batch_stats": updates["batch_stats"]}


def _backbone_stage(name):
  """Backbone parameter group name -> stage ("conv1" -> "stem", "layer3_2" -> "layer3")."""
  return "stem" if name == "conv1" else name.split("_")[0]


def trainable_mask(params, backbone_trainable, train_only_mask_head):
  """Pytree of bools like `params`: False for backbone stages not in `backbone_trainable`;
  with `train_only_mask_head`, True only in the segmentation head (`MASK_HEAD_MODULES`)."""
  flat = flax.traverse_util.flatten_dict(params)
  mask = {}
  for path in flat:
    if train_only_mask_head:
      mask[path] = path[0] in MASK_HEAD_MODULES
    elif path[0] == "backbone":
      mask[path] = _backbone_stage(path[1]) in backbone_trainable
    else:
      mask[path] = True
  return flax.traverse_util.unflatten_dict(mask)


def count_params(params, mask=None):
  """Number of parameter values, or of those where `mask` is True."""
  leaves = jax.tree.leaves(params)
  if mask is None:
    return sum(x.size for x in leaves)
  return sum(x.size for x, m in zip(leaves, jax.tree.leaves(mask)) if m)
