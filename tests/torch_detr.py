"""The `transformers` package's PyTorch DETR (random init, nothing downloaded) as an oracle.

`build_hf_detr` builds DETR-R50 with the transformers-native ResNet backbone; `reference_state_dict`
exports its weights under the reference DETR key names (q/k/v packed into `in_proj_*`), the
layout `detr_jax.convert.torch_to_flax` imports; `seed_state_dict` renames those to the seed
re-implementation's names. `torchvision_resnet18` gives a random ResNet-18 in torchvision's
layout with its forward pass.
"""

import re

import numpy as np
import torch

_SUBS = [
  (r"^model\.backbone\.model\.embedder\.embedder\.convolution\.", "backbone.0.body.conv1."),
  (r"^model\.backbone\.model\.embedder\.embedder\.normalization\.", "backbone.0.body.bn1."),
  (r"^model\.input_projection\.", "input_proj."),
  (r"^model\.query_position_embeddings\.", "query_embed."),
  (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
  (r"^class_labels_classifier\.", "class_embed."),
  (r"^bbox_predictor\.", "bbox_embed."),
]
_LAYER_SUBS = {
  "encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"},
  "decoder": {
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
    "encoder_attn": "multihead_attn",
  },
}


# A small DETR: ResNet-18 layout, d_model 64, 1 encoder and 2 decoder layers, 10 queries.
SMALL = dict(
  d_model=64,
  encoder_layers=1,
  decoder_layers=2,
  encoder_attention_heads=4,
  decoder_attention_heads=4,
  encoder_ffn_dim=128,
  decoder_ffn_dim=128,
  num_queries=10,
)


def build_hf_detr(num_labels=91, seed=0, small=False):
  """A random-init transformers DetrForObjectDetection (eval mode, no aux loss).

  R50 with the reference sizes, or with `small` a ResNet-18 trunk and the SMALL sizes.
  """
  from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

  torch.manual_seed(seed)
  backbone = ResNetConfig(out_features=["stage4"])
  if small:
    backbone = ResNetConfig(
      out_features=["stage4"],
      layer_type="basic",
      depths=[2, 2, 2, 2],
      hidden_sizes=[64, 128, 256, 512],
    )
  cfg = DetrConfig(
    use_timm_backbone=False,
    use_pretrained_backbone=False,
    backbone_config=backbone,
    num_labels=num_labels,
    auxiliary_loss=False,
    **(SMALL if small else {}),
  )
  model = DetrForObjectDetection(cfg).eval()
  _randomize_frozen_batch_norms(model, seed + 1)
  return model


def _randomize_frozen_batch_norms(model, seed):
  """Frozen BatchNorm buffers start as identity; make them random (but tame) so that they
  are really tested."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, buf in model.named_buffers():
      n = buf.numel()
      if name.endswith("running_var"):
        buf.copy_(0.5 + torch.rand(n, generator=g))
      elif name.endswith("running_mean"):
        buf.copy_(0.2 * (torch.rand(n, generator=g) - 0.5))
      elif name.endswith("normalization.weight"):
        buf.copy_(0.2 + 0.6 * torch.rand(n, generator=g))
      elif name.endswith("normalization.bias"):
        buf.copy_(0.2 * (torch.rand(n, generator=g) - 0.5))


# The segmentation head needs hidden_dim + heads divisible by 8 (its first GroupNorm).
SEGM_SMALL = dict(SMALL, encoder_attention_heads=8, decoder_attention_heads=8)


def build_hf_detr_segmentation(num_labels, seed=0):
  """A random-init transformers DetrForSegmentation (eval mode, no aux loss): a ResNet-18
  trunk returning stages 1..4, the SEGM_SMALL sizes. The head's GroupNorm affine parameters
  and all its biases (which start at 1 / 0) are made random too."""
  from transformers import DetrConfig, DetrForSegmentation, ResNetConfig

  torch.manual_seed(seed)
  backbone = ResNetConfig(
    out_features=["stage1", "stage2", "stage3", "stage4"],
    layer_type="basic",
    depths=[2, 2, 2, 2],
    hidden_sizes=[64, 128, 256, 512],
  )
  cfg = DetrConfig(
    use_timm_backbone=False,
    use_pretrained_backbone=False,
    backbone_config=backbone,
    num_labels=num_labels,
    auxiliary_loss=False,
    **SEGM_SMALL,
  )
  model = DetrForSegmentation(cfg).eval()
  _randomize_frozen_batch_norms(model, seed + 1)
  g = torch.Generator().manual_seed(seed + 2)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.startswith(("mask_head.", "bbox_attention.")) and p.ndim == 1:
        base = 1.0 if name.endswith("norm.weight") else 0.0
        p.copy_(base + 0.2 * (torch.rand(p.shape, generator=g) - 0.5))
  return model


# transformers 5's segmentation-head module names -> the reference DETRsegm's.
_SEGM_HEAD = {
  "bbox_attention.q_proj": "bbox_attention.q_linear",
  "bbox_attention.k_proj": "bbox_attention.k_linear",
  "mask_head.conv1.conv": "mask_head.lay1",
  "mask_head.conv1.norm": "mask_head.gn1",
  "mask_head.conv2.conv": "mask_head.lay2",
  "mask_head.conv2.norm": "mask_head.gn2",
  "mask_head.output_conv": "mask_head.out_lay",
}
for _i in range(3):
  _SEGM_HEAD[f"mask_head.fpn_stages.{_i}.fpn_adapter"] = f"mask_head.adapter{_i + 1}"
  _SEGM_HEAD[f"mask_head.fpn_stages.{_i}.refine.conv"] = f"mask_head.lay{_i + 3}"
  _SEGM_HEAD[f"mask_head.fpn_stages.{_i}.refine.norm"] = f"mask_head.gn{_i + 3}"


def segmentation_head_name(key, legacy):
  """A DetrForSegmentation head key under the reference's name (`legacy`) or unchanged."""
  module, leaf = key.rsplit(".", 1)
  return f"{_SEGM_HEAD[module]}.{leaf}" if legacy else key


def reference_segmentation_state_dict(model):
  """DetrForSegmentation weights under the reference DETRsegm key names (`detr.` + the
  reference DETR names, `bbox_attention.*`, `mask_head.*`), float32 NumPy."""
  box, head = {}, {}
  for k, v in model.state_dict().items():
    if k.startswith("detr."):
      box[k[len("detr.") :]] = v
    else:
      head[segmentation_head_name(k, legacy=True)] = v.detach().numpy().astype(np.float32)
  out = {f"detr.{k}": v for k, v in _reference_names(box).items()}
  out.update(head)
  return out


def hf_segmentation_outputs(model, images_nhwc):
  """(logits [B, Q, K+1], boxes [B, Q, 4], mask logits [B, Q, H/4, W/4]) NumPy."""
  x = torch.from_numpy(np.transpose(images_nhwc, (0, 3, 1, 2)).copy())
  with torch.no_grad():
    out = model(pixel_values=x)
  return out.logits.numpy(), out.pred_boxes.numpy(), out.pred_masks.numpy()


def small_segmentation_config(num_labels):
  """Our `config.model` matching `build_hf_detr_segmentation`."""
  c = small_model_config(num_labels)
  c.num_heads = SEGM_SMALL["encoder_attention_heads"]
  c.masks = True
  return c


def _rename(key):
  m = re.match(r"^model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)$", key)
  if m:
    stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
    rest = re.sub(r"^shortcut\.convolution\.", "downsample.0.", rest)
    rest = re.sub(r"^shortcut\.normalization\.", "downsample.1.", rest)
    rest = re.sub(r"^layer\.(\d+)\.convolution\.", lambda k: f"conv{int(k.group(1)) + 1}.", rest)
    rest = re.sub(r"^layer\.(\d+)\.normalization\.", lambda k: f"bn{int(k.group(1)) + 1}.", rest)
    return f"backbone.0.body.layer{stage + 1}.{block}.{rest}"
  m = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.*)$", key)
  if m:
    kind, i, rest = m.groups()
    for old, new in _LAYER_SUBS[kind].items():
      rest = re.sub(rf"^{old}\.", f"{new}.", rest)
    rest = rest.replace("mlp.fc1.", "linear1.").replace("mlp.fc2.", "linear2.")
    rest = rest.replace("o_proj.", "out_proj.")
    return f"transformer.{kind}.layers.{i}.{rest}"
  for pattern, repl in _SUBS:
    if re.match(pattern, key):
      return re.sub(pattern, repl, key)
  raise KeyError(key)


def reference_state_dict(model):
  """HF DETR weights under the reference DETR key names, as float32 NumPy arrays."""
  return _reference_names(model.state_dict())


def _reference_names(state_dict):
  sd = {_rename(k): v.detach().numpy().astype(np.float32) for k, v in state_dict.items()}
  out = {}
  for k, v in sd.items():
    m = re.match(r"^(.*)\.(q|k|v)_proj\.(weight|bias)$", k)
    if not m:
      out[k] = v
      continue
    base, which, kind = m.groups()
    if which != "q":
      continue
    parts = [sd[f"{base}.{w}_proj.{kind}"] for w in "qkv"]
    out[f"{base}.in_proj_{kind}"] = np.concatenate(parts, axis=0)
  return out


def small_model_overrides(num_labels):
  """The fields of our `config.model` that `build_hf_detr(small=True)` changes (plain data)."""
  return dict(
    backbone="resnet18",
    num_classes=num_labels,
    hidden_dim=SMALL["d_model"],
    num_heads=SMALL["encoder_attention_heads"],
    dim_feedforward=SMALL["encoder_ffn_dim"],
    num_encoder_layers=SMALL["encoder_layers"],
    num_decoder_layers=SMALL["decoder_layers"],
    num_queries=SMALL["num_queries"],
  )


def small_model_config(num_labels):
  """Our `config.model` matching `build_hf_detr(small=True)`."""
  from configs import base

  c = base.get_model_config()
  c.update(small_model_overrides(num_labels))
  return c


def seed_state_dict(reference):
  """A reference-layout state dict under the seed re-implementation's names.

  The seed's naming (its checkpoint-layout notes) read from right to left: the stem and
  stages become `backbone.{0,1,4..7}`, `in_proj_*` splits into `attn.{q,k,v}`, the heads are
  `class_layer` and `box_layer.box_layers.{0,2,4}`.
  """
  attn = {
    ("encoder", "self_attn"): "attn",
    ("decoder", "self_attn"): "attn_t",
    ("decoder", "multihead_attn"): "attn_x",
  }
  out = {}
  for k, v in reference.items():
    if m := re.fullmatch(r"backbone\.0\.body\.(conv1|bn1)\.(\w+)", k):
      out[f"backbone.{int(m[1] == 'bn1')}.{m[2]}"] = v
    elif m := re.fullmatch(r"backbone\.0\.body\.layer([1-4])\.(.+)", k):
      out[f"backbone.{int(m[1]) + 3}.{m[2]}"] = v
    elif m := re.fullmatch(r"transformer\.(\w+)coder\.layers\.(\d+)\.(\w+)\.(.+)", k):
      kind, i, sub, rest = m[1] + "coder", m[2], m[3], m[4]
      base = f"transformer.{kind}.{kind}s.{i}"
      if sub in ("self_attn", "multihead_attn"):
        name = attn[(kind, sub)]
        if rest.startswith("in_proj_"):
          leaf = rest[len("in_proj_") :]
          for which, part in zip("qkv", np.split(v, 3, axis=0)):
            out[f"{base}.{name}.{which}.{leaf}"] = part
        else:
          out[f"{base}.{name}.proj.{rest.split('.')[-1]}"] = v
      elif sub in ("linear1", "linear2"):
        out[f"{base}.mlp.fc{sub[-1]}.{rest}"] = v
      else:  # norm1..3
        out[f"{base}.{sub}.{rest}"] = v
    elif m := re.fullmatch(r"class_embed\.(\w+)", k):
      out[f"class_layer.{m[1]}"] = v
    elif m := re.fullmatch(r"bbox_embed\.layers\.(\d)\.(\w+)", k):
      out[f"box_layer.box_layers.{2 * int(m[1])}.{m[2]}"] = v
    else:  # transformer.decoder.norm, input_proj, query_embed
      out[k] = v
  return out


def _randomize_batch_norms(model, seed):
  """Random but tame BatchNorm statistics and affine parameters (they start as identity)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        module.running_var.copy_(0.5 + torch.rand(n, generator=g))
        module.running_mean.copy_(0.2 * (torch.rand(n, generator=g) - 0.5))
        module.weight.copy_(0.2 + 0.6 * torch.rand(n, generator=g))
        module.bias.copy_(0.2 * (torch.rand(n, generator=g) - 0.5))


def torchvision_resnet18(seed=0):
  """A random ResNet-18 in torchvision's layout: (state dict, features fn).

  The state dict is what torchvision's `resnet18().state_dict()` holds (`conv1.weight`,
  `layer1.0.bn1.running_mean`, `...num_batches_tracked` int64 buffers, `fc.*`);
  `features(x)` maps NCHW float32 images to layer4's output (NCHW, eval-mode BatchNorm).
  From torchvision itself where it imports. The torchvision wheel on this project's package
  index is a CUDA build that does not load beside torch+cpu (and, installed, breaks
  `transformers`), so otherwise the transformers ResNet-18 (basic blocks, the same trunk)
  supplies the weights and the forward pass, its keys renamed to torchvision's.
  """
  torch.manual_seed(seed)
  try:
    from torchvision.models import resnet18
  except ImportError:
    resnet18 = None
  if resnet18 is not None:
    model = resnet18().eval()
    _randomize_batch_norms(model, seed + 1)
    trunk = torch.nn.Sequential(*list(model.children())[:-2])
    return model.state_dict(), trunk
  from transformers import ResNetBackbone, ResNetConfig

  config = ResNetConfig(
    out_features=["stage4"],
    layer_type="basic",
    depths=[2, 2, 2, 2],
    hidden_sizes=[64, 128, 256, 512],
  )
  model = ResNetBackbone(config).eval()
  _randomize_batch_norms(model, seed + 1)
  prefix = len("backbone.0.body.")
  state_dict = {
    _rename("model.backbone.model." + k)[prefix:]: v for k, v in model.state_dict().items()
  }
  state_dict["fc.weight"] = torch.randn(1000, 512) * 0.01
  state_dict["fc.bias"] = torch.zeros(1000)
  return state_dict, lambda x: model(x).feature_maps[-1]


def hf_outputs(model, images_nhwc):
  """Logits and boxes of every decoder layer: ([L, B, Q, K+1], [L, B, Q, 4]) NumPy."""
  x = torch.from_numpy(np.transpose(images_nhwc, (0, 3, 1, 2)).copy())
  with torch.no_grad():
    out = model(pixel_values=x, output_hidden_states=True)
    hidden = out.decoder_hidden_states[1:]  # outputs of layers 0..L-1, before the norm
    norm = model.model.decoder.layernorm
    logits = torch.stack([model.class_labels_classifier(norm(h)) for h in hidden])
    boxes = torch.stack([model.bbox_predictor(norm(h)).sigmoid() for h in hidden])
    np.testing.assert_allclose(logits[-1].numpy(), out.logits.numpy(), atol=1e-5)
  return logits.numpy(), boxes.numpy()
