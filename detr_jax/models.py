"""The DETR model: backbone -> input projection -> transformer -> class and box heads, and with
`config.model.masks` the reference's segmentation head (`detr_jax/segmentation.py`)."""

import math
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax import backbone as backbone_lib
from detr_jax import conditional, position, segmentation, transformer
from detr_jax import conv as conv_lib

# Top-level parameter modules of the segmentation head (DETRsegm's `bbox_attention.*` and
# `mask_head.*`); everything else is the box model (DETRsegm's `detr.*`).
MASK_HEAD_MODULES = ("bbox_attention", "mask_head")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DECODERS = ("detr", "conditional")
CLASSIFIERS = ("softmax", "sigmoid")
# Sigmoid classifier: the class bias starts at -log((1 - p) / p), p = 0.01 (focal loss prior).
_PRIOR_PROB = 0.01


def _torch_linear_init(fan_in):
  """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class BoxHead(nn.Module):
  """The 3-layer box MLP (D -> D -> D -> 4, ReLU between) with sigmoid: [..., D] -> [..., 4].

  `zero_last`: the last layer starts at zero (Conditional DETR's init; DETR's is PyTorch's
  default). `reference` (None, or [..., 2] pre-sigmoid (x, y) broadcasting against the
  output) is added to the predicted centre before the sigmoid (Conditional DETR).
  """

  dtype: jnp.dtype
  zero_last: bool

  @nn.compact
  def __call__(self, x, reference):
    d = x.shape[-1]
    for i, n in enumerate((d, d, 4)):
      init = _torch_linear_init(d)
      if i == 2 and self.zero_last:
        init = nn.initializers.zeros
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
    x = x.astype(jnp.float32)
    if reference is not None:
      x = jnp.concatenate([x[..., :2] + reference, x[..., 2:]], axis=-1)
    return jax.nn.sigmoid(x)


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
  decoder: str
  classifier: str
  num_detections: int
  groups: int
  calibrate_bn: bool = False  # see calibrate_batch_norm

  @nn.compact
  def __call__(self, images, train=False):
    """Detects objects.

    Args:
      images: [B, H, W, 3] float32, ImageNet-normalized; H and W divisible by the stride.
      train: enables dropout (needs a `dropout` rng) and, on CPU, the backbone convolutions
        built for gradients (`conv.conv2d`); False runs the fastest forward. With `groups`
        G > 1, training runs G x Q queries (Group DETR: G groups of Q that do not see each
        other in self-attention) and False runs the first group only.

    Returns:
      dict with `pred_logits` [B, Q', C], `pred_boxes` [B, Q', 4] (normalized cxcywh),
      `aux_outputs`: list of such dicts for decoder layers 0..L-2; Q' = G x Q when training,
      Q otherwise (queries group-major: query g * Q + q is query q of group g). C = K+1 for
      the softmax classifier (last = no object), K for the sigmoid one. Logits and boxes are
      float32 whatever the compute dtype.
      With `masks`, also `pred_masks` [B, Q, H/4, W/4]: mask logits of the last decoder
      layer's queries (float32). With `train_only_mask_head` no gradient reaches the box
      model (it runs forward only).
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
      "query_embed",
      nn.initializers.normal(1.0),
      (self.groups * self.num_queries, d),
      jnp.float32,
    )
    groups = self.groups if train else 1
    if groups < self.groups:
      query_embed = query_embed[: self.num_queries]
    kw = dict(
      num_heads=self.num_heads,
      num_encoder_layers=self.num_encoder_layers,
      num_decoder_layers=self.num_decoder_layers,
      dim_feedforward=self.dim_feedforward,
      dropout=self.dropout,
      attention=self.attention,
      conv=self.conv,
      remat=self.remat,
      dtype=self.dtype,
      name="transformer",
    )
    src = x.reshape(b, h * w, d)
    reference = memory = None
    if self.decoder == "conditional":
      hs, reference = conditional.ConditionalTransformer(**kw)(
        src, pos, query_embed, not train, groups
      )
      reference = conditional.inverse_sigmoid(reference)  # [Q, 2]
    else:
      out = transformer.Transformer(pre_norm=self.pre_norm, return_memory=self.masks, **kw)(
        src, pos, query_embed, not train, groups
      )
      hs, memory = out if self.masks else (out, None)
    if frozen_box_model:
      hs, memory, x = jax.lax.stop_gradient((hs, memory, x))
    init = _torch_linear_init(d)
    num_logits = self.num_classes + (self.classifier == "softmax")
    bias_init = init
    if self.classifier == "sigmoid":
      bias_init = nn.initializers.constant(-math.log((1 - _PRIOR_PROB) / _PRIOR_PROB))
    logits = nn.Dense(
      num_logits,
      kernel_init=init,
      bias_init=bias_init,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="class_embed",
    )(hs).astype(jnp.float32)
    boxes = BoxHead(self.dtype, self.decoder == "conditional", name="bbox_embed")(hs, reference)
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
    if c.decoder != "detr" or c.groups != 1:
      raise ValueError(
        "config.model.masks=True needs the reference decoder and one query group "
        f'(config.model.decoder="detr", groups=1), not {c.decoder!r} with {c.groups}'
      )
  elif c.train_only_mask_head:
    raise ValueError("config.model.train_only_mask_head=True needs config.model.masks=True")
  if c.decoder not in DECODERS:
    raise ValueError(f"config.model.decoder={c.decoder!r}; choose from {DECODERS}")
  if c.classifier not in CLASSIFIERS:
    raise ValueError(f"config.model.classifier={c.classifier!r}; choose from {CLASSIFIERS}")
  if c.decoder == "conditional" and c.pre_norm:
    raise ValueError(
      'config.model.decoder="conditional" is post-norm only (as the original release); '
      "set config.model.pre_norm=False"
    )
  if c.groups < 1:
    raise ValueError(f"config.model.groups={c.groups} must be >= 1")
  if c.num_detections < 1:
    raise ValueError(f"config.model.num_detections={c.num_detections} must be >= 1")
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
    decoder=c.decoder,
    classifier=c.classifier,
    num_detections=c.num_detections,
    groups=c.groups,
  )


def init_variables(model, rng):
  """The model's initial variables `{"params", "batch_stats"}` from `rng` (jitted).

  No variable depends on the image size (the position embedding is a constant of the feature
  grid), so the model is initialized on the smallest valid image: the same values as at any
  size, and one compiled program per model whatever the image size.
  """
  side = 2 * backbone_lib.output_stride(model.dilation)

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, side, side, 3), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}

  return jax.jit(init)(rng)


def abstract_variables(model):
  """`init_variables`' pytree as `jax.ShapeDtypeStruct`s, computed without running anything."""
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))


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
