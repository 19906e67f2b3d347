"""The `transformers` package's PyTorch Conditional DETR (random init, nothing downloaded) as an
oracle, and its weights in the two other layouts that `detr_jax.convert` reads.

`build_hf_conditional_detr` builds a small ConditionalDetrForObjectDetection (ResNet-18 trunk,
the SMALL sizes of tests/torch_detr.py) with every weight random and sizeable (so that a
swapped or missing weight shows in the outputs); `hf_outputs` runs it and gives every decoder
layer's logits and boxes; `hub_state_dict` and `original_state_dict` rename its
`state_dict()` (transformers 5) to the layout of the model hub's transformers-4 safetensors
and to the original Atten4Vis/ConditionalDETR release's.
"""

import re

import numpy as np
import torch
import torch_detr


def build_hf_conditional_detr(num_labels, seed=0):
  """A random-init transformers ConditionalDetrForObjectDetection (eval mode, no aux loss)."""
  from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, ResNetConfig

  torch.manual_seed(seed)
  backbone = ResNetConfig(
    out_features=["stage4"],
    layer_type="basic",
    depths=[2, 2, 2, 2],
    hidden_sizes=[64, 128, 256, 512],
  )
  cfg = ConditionalDetrConfig(
    use_timm_backbone=False,
    use_pretrained_backbone=False,
    backbone_config=backbone,
    num_labels=num_labels,
    auxiliary_loss=False,
    **torch_detr.SMALL,
  )
  model = ConditionalDetrForObjectDetection(cfg).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.startswith("model.backbone"):
        continue
      if p.dim() > 1:  # xavier-uniform, the original's init of every transformer matrix
        bound = (6.0 / (p.shape[0] + p.shape[1])) ** 0.5
        p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
      elif "layer_norm" in name or "layernorm" in name:
        p.copy_(
          (1.0 if name.endswith("weight") else 0.0) + 0.4 * (torch.rand(p.shape, generator=g) - 0.5)
        )
      else:
        p.copy_(0.4 * (torch.rand(p.shape, generator=g) - 0.5))
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
  return model


def state_dict(model):
  """The model's `state_dict()` as float32 NumPy arrays (transformers 5 layout)."""
  return {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def hf_outputs(model, images_nhwc):
  """Logits and boxes of every decoder layer: ([L, B, Q, K], [L, B, Q, 4]) NumPy.

  The auxiliary layers as the original release computes them: the shared final LayerNorm on
  each layer's output, the heads, and the box centre offset by the inverse-sigmoid reference
  point. (transformers' own auxiliary outputs, with `auxiliary_loss=True`, feed the normalized
  output back into the next layer, which the original does not.)
  """
  x = torch.from_numpy(np.transpose(images_nhwc, (0, 3, 1, 2)).copy())
  hidden = []  # outputs of decoder layers 0..L-1, before the final LayerNorm
  hooks = [
    layer.register_forward_hook(lambda _m, _i, out: hidden.append(out))
    for layer in model.model.decoder.layers
  ]
  with torch.no_grad():
    full = model(pixel_values=x)
    hidden.clear()
    out = model.model(pixel_values=x)
    for hook in hooks:
      hook.remove()
    norm = model.model.decoder.layernorm
    ref = out.reference_points.transpose(0, 1)  # [B, Q, 2]
    ref = torch.log(ref.clamp(min=1e-5) / (1 - ref).clamp(min=1e-5))
    logits, boxes = [], []
    for h in hidden:
      h = norm(h)
      logits.append(model.class_labels_classifier(h))
      delta = model.bbox_predictor(h)
      boxes.append(torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1).sigmoid())
    logits, boxes = torch.stack(logits), torch.stack(boxes)
    np.testing.assert_allclose(logits[-1].numpy(), full.logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(boxes[-1].numpy(), full.pred_boxes.numpy(), atol=1e-5)
  return logits.numpy(), boxes.numpy()


_V4_ATTN = {"self_attn": "sa", "encoder_attn": "ca"}


def hub_state_dict(sd):
  """transformers 5 names -> the transformers 4 names of the hub's safetensors.

  Per transformers' own checkpoint conversion table, read right to left: the decoder's
  `self_attn.q_content_proj` is `sa_qcontent_proj` (and so on), `encoder_attn.*` the `ca_*`
  projections, `o_proj` is `out_proj`, `mlp.fc1` is `fc1`, and the backbone sits under
  `backbone.conv_encoder`.
  """
  out = {}
  for k, v in sd.items():
    k = k.replace("model.backbone.", "model.backbone.conv_encoder.")
    k = re.sub(r"\.mlp\.fc([12])\.", r".fc\1.", k)
    k = re.sub(r"\.o_proj\.", ".out_proj.", k)
    m = re.fullmatch(
      r"(model\.decoder\.layers\.\d+)\.(self_attn|encoder_attn)\.(q_content|q_pos|k_content|"
      r"k_pos|v|q_pos_sine)_proj\.(weight|bias)",
      k,
    )
    if m:
      proj = m[3].replace("_content", "content").replace("_pos", "pos")
      k = f"{m[1]}.{_V4_ATTN[m[2]]}_{proj}_proj.{m[4]}"
    out[k] = v
  return out


_ORIGINAL_NORMS = {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2"}


def original_state_dict(sd):
  """transformers 5 names -> the original Atten4Vis/ConditionalDETR release's.

  Its modules (models/conditional_detr.py, transformer.py): `backbone.0.body` (torchvision
  ResNet), `input_proj`, `query_embed`, `transformer.encoder.layers.i` as DETR's
  (`self_attn.in_proj_*` packed q, k, v; `linear1/2`; `norm1/2`),
  `transformer.decoder.layers.i.{sa,ca}_*_proj`, `self_attn.out_proj`, `cross_attn.out_proj`,
  `linear1/2`, `norm1..3`; `transformer.decoder.{norm,query_scale,ref_point_head}`,
  `class_embed`, `bbox_embed`.
  """
  reference = {}
  for k, v in hub_state_dict(sd).items():
    if k.startswith("model.backbone.conv_encoder.model."):
      hf_native = "model.backbone.model." + k[len("model.backbone.conv_encoder.model.") :]
      reference[torch_detr._rename(hf_native)] = v  # the reference trunk names
      continue
    k = k.replace("model.input_projection.", "input_proj.")
    k = k.replace("model.query_position_embeddings.", "query_embed.")
    k = k.replace("class_labels_classifier.", "class_embed.")
    k = k.replace("bbox_predictor.", "bbox_embed.")
    k = k.replace("model.decoder.layernorm.", "transformer.decoder.norm.")
    k = re.sub(r"^model\.(encoder|decoder)\.", r"transformer.\1.", k)
    k = re.sub(r"\.fc([12])\.", r".linear\1.", k)
    k = re.sub(r"(decoder\.layers\.\d+)\.encoder_attn\.out_proj", r"\1.cross_attn.out_proj", k)
    for old, new in _ORIGINAL_NORMS.items():
      k = k.replace(f".{old}.", f".{new}.")
    k = k.replace(".final_layer_norm.", ".norm3." if ".decoder." in k else ".norm2.")
    reference[k] = v
  out = {}
  for k, v in reference.items():  # encoder q, k, v -> in_proj (rows q, k, v)
    m = re.fullmatch(r"(transformer\.encoder\.layers\.\d+\.self_attn)\.([qkv])_proj\.(\w+)", k)
    if not m:
      out[k] = v
    elif m[2] == "q":
      parts = [reference[f"{m[1]}.{w}_proj.{m[3]}"] for w in "qkv"]
      out[f"{m[1]}.in_proj_{m[3]}"] = np.concatenate(parts, axis=0)
  return out
