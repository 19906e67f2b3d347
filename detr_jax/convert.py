"""Weight import from every DETR checkpoint layout, without torch.

Files: `.pth` / `.pth.tar` written by `torch.save` (read by `torch_io`, which never runs pickled
code) and `.safetensors`. Layouts, detected from the key names:
- `reference`: the reference DETR release (`{'model': ...}`, R50/R101/DC5/DC5-R101).
- `seed`: the seed re-implementation's `<name>.best.pth.tar` (`{'model_state_dict': ...}`,
  its own module names, q/k/v as separate linears).
- `transformers`: the `transformers` DETR (`model.safetensors` of the model hub's
  `facebook/detr-resnet-50` / `-101`, or a `state_dict()` of `DetrForObjectDetection`), with a
  timm / torchvision-named ResNet backbone (the hub's) or the transformers-native ResNet.
- `torchvision`: a torchvision ImageNet ResNet (backbone only; `fc.*` is dropped).
- `conditional`: the original Conditional DETR release (Atten4Vis/ConditionalDETR,
  `{'model': ...}`): DETR's names plus the conditional decoder's `sa_*_proj` / `ca_*_proj`
  projections, `self_attn.out_proj` / `cross_attn.out_proj` and `transformer.decoder.
  {query_scale,ref_point_head}`. These are the reference names of a Conditional DETR.
- `transformers_conditional`: the `transformers` Conditional DETR (`model.safetensors` of the
  model hub's `microsoft/conditional-detr-resnet-50`, saved by transformers 4:
  `sa_qcontent_proj`, `encoder_attn.out_proj`, `fc1`, timm backbone names; or a
  `state_dict()` of transformers 5's `ConditionalDetrForObjectDetection`:
  `self_attn.q_content_proj`, `encoder_attn.q_pos_sine_proj`, `o_proj`, `mlp.fc1`, the
  transformers-native ResNet).
A Conditional DETR imports into a
config with `model.decoder="conditional"` and `model.classifier="sigmoid"` (its class head
has K outputs); `model.groups` must be 1 unless the file holds G x Q query embeddings.

Segmentation models (`config.model.masks`) come as the reference's DETRsegm (the released
panoptic R50 / DC5-R50 / R101: `detr.*` box model, `bbox_attention.{q,k}_linear.*`,
`mask_head.{lay1..5,gn1..5,adapter1..3,out_lay}.*`) or as `transformers`'
`DetrForSegmentation` (`detr.model.*`, `detr.class_labels_classifier.*`, ...; the head under
the reference names in transformers 4 files such as the hub's `facebook/detr-resnet-50-panoptic`,
as `bbox_attention.{q,k}_proj`, `mask_head.conv1.conv`, `mask_head.fpn_stages.0.fpn_adapter`,
... in transformers 5). Every layout is first renamed to the reference key names
(`normalize_state_dict`), where a segmentation model's box part loses its `detr.` prefix (so
a box-only file and a DETRsegm file differ exactly by the head's keys); the
`num_batches_tracked` counters of every layout are dropped.

- `load_torch_checkpoint(path)`: the file's weights under reference names, float32 NumPy.
- `torch_to_flax(state_dict, model_config)`: the variables `model.apply` takes, from a full
  DETR in any layout. Every expected key must be present with the right shape and every key
  must be used: otherwise a `ValueError` lists the missing, unexpected and mis-shaped keys.
- `torchvision_resnet_to_flax(state_dict, variables, model_config)`: replaces the backbone
  of `variables` by a backbone-only state dict (any layout; torchvision's ImageNet weights).
- `merge_pretrained(pretrained, initialized)`: fine-tuning with another class count keeps
  everything but the class head.

CLI (writes a checkpoint that `eval.py --workdir DIR` evaluates):
  python -m detr_jax.convert FILE_OR_URL --config configs/coco_500ep.py --workdir DIR
A backbone-only file initializes the backbone and the rest randomly (from `config.seed`);
`--backbone_only` takes only the backbone of a full DETR file.
"""

import argparse
import collections
import re

import flax
import jax
import numpy as np
from absl import logging

from detr_jax import models, pretrained, torch_io

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
BODY = "backbone.0.body."  # reference prefix of the ResNet trunk

# ---- Layouts: key renaming to the reference names -------------------------------------------
# Each layout is a list of (regex, replacement) rules; a key takes the first rule whose regex
# matches all of it. The replacement is a `re` template, a function of the match, or None to
# drop the key. q/k/v projections come out as `<attn>.{q,k,v}_proj.*` and are packed into the
# reference's `in_proj_*` afterwards.
_SAME = r"\g<0>"
_TRUNK = (  # torchvision (and timm) ResNet names, one group
  r"(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\."
  r"(?:conv[1-3]\.weight|bn[1-3]\.\w+|downsample\.0\.weight|downsample\.1\.\w+))"
)
_SEED_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "proj": "out_proj"}
_HF_ATTN = {"self_attn": "self_attn", "encoder_attn": "multihead_attn"}
_HF_NORMS = {
  "encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"},
  "decoder": {
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
  },
}
# transformers 4 saves `model.backbone.conv_encoder.model.`, 5's modules say `model.backbone.model.`
_HF_TRUNK = r"model\.backbone\.(?:conv_encoder\.)?model\."
_HF_STAGE = _HF_TRUNK + r"encoder\.stages\.([0-3])\.layers\.(\d+)\."

# Rules the transformers DETR and Conditional DETR layouts share: FFN and layer norms of each
# encoder/decoder layer and the decoder's final norm; the projection, queries and heads.
_HF_FFN_AND_NORMS = (
  (
    r"model\.(encoder|decoder)\.layers\.(\d+)\.(?:mlp\.)?fc([12])\.(weight|bias)",
    r"transformer.\1.layers.\2.linear\3.\4",
  ),
  (
    r"model\.(encoder|decoder)\.layers\.(\d+)\.(\w+_layer_norm)\.(weight|bias)",
    lambda m: (
      f"transformer.{m[1]}.layers.{m[2]}.{_HF_NORMS[m[1]][m[3]]}.{m[4]}"
      if m[3] in _HF_NORMS[m[1]]
      else None
    ),
  ),
  (r"model\.decoder\.layernorm\.(weight|bias)", r"transformer.decoder.norm.\1"),
)
_HF_HEADS = (
  (r"model\.input_projection\.(weight|bias)", r"input_proj.\1"),
  (r"model\.query_position_embeddings\.weight", "query_embed.weight"),
  (r"class_labels_classifier\.(weight|bias)", r"class_embed.\1"),
  (r"bbox_predictor\.layers\.(\d+)\.(weight|bias)", r"bbox_embed.layers.\1.\2"),
)


# The segmentation head (DETRsegm's `bbox_attention`, `mask_head`): reference names, which
# transformers 4 used too, and transformers 5's module names.
_HEAD = r"(bbox_attention\.[qk]_linear|mask_head\.(?:lay[1-5]|gn[1-5]|adapter[1-3]|out_lay))"
_HEAD_REFERENCE = [(_HEAD + r"\.(weight|bias)", _SAME)]
_HEAD_HF5 = [
  (r"bbox_attention\.([qk])_proj\.(weight|bias)", r"bbox_attention.\1_linear.\2"),
  (r"mask_head\.conv([12])\.conv\.(weight|bias)", r"mask_head.lay\1.\2"),
  (r"mask_head\.conv([12])\.norm\.(weight|bias)", r"mask_head.gn\1.\2"),
  (
    r"mask_head\.fpn_stages\.([0-2])\.fpn_adapter\.(weight|bias)",
    lambda m: f"mask_head.adapter{int(m[1]) + 1}.{m[2]}",
  ),
  (
    r"mask_head\.fpn_stages\.([0-2])\.refine\.(conv|norm)\.(weight|bias)",
    lambda m: f"mask_head.{'lay' if m[2] == 'conv' else 'gn'}{int(m[1]) + 3}.{m[3]}",
  ),
  (r"mask_head\.output_conv\.(weight|bias)", r"mask_head.out_lay.\1"),
]
_HEAD_PREFIXES = ("bbox_attention.", "mask_head.")
SEGM_PREFIX = "detr."  # DETRsegm's (and DetrForSegmentation's) prefix of the box model


def _hf_native_block(m):
  """transformers ResNet `stages.S.layers.J.layer.K.{convolution,normalization}.*`."""
  stage, block, k, kind, leaf = m.groups()
  name = "conv" if kind == "convolution" else "bn"
  return f"{BODY}layer{int(stage) + 1}.{block}.{name}{int(k) + 1}.{leaf}"


def _hf_native_shortcut(m):
  stage, block, kind, leaf = m.groups()
  return f"{BODY}layer{int(stage) + 1}.{block}.downsample.{int(kind == 'normalization')}.{leaf}"


_COND_PROJ = {"q_content": "qcontent", "q_pos": "qpos", "k_content": "kcontent", "k_pos": "kpos"}
_COND_PROJ.update(v="v", q_pos_sine="qpos_sine")
_COND_ATTN = {"self_attn": ("sa", "self_attn"), "encoder_attn": ("ca", "cross_attn")}


def _hf_conditional_proj(m):
  """transformers 5 `layers.I.{self_attn,encoder_attn}.X_proj` -> the original's names."""
  layer, attn, proj, leaf = m.groups()
  prefix, out_name = _COND_ATTN[attn]
  base = f"transformer.decoder.layers.{layer}."
  if proj in ("o", "out"):
    return f"{base}{out_name}.out_proj.{leaf}"
  if proj not in _COND_PROJ or (prefix == "sa" and proj == "q_pos_sine"):
    return None
  return f"{base}{prefix}_{_COND_PROJ[proj]}_proj.{leaf}"


# Conditional DETR decoder projections under the original's names.
_COND_DECODER_PROJ = (
  r"(?:sa_(?:qcontent|qpos|kcontent|kpos|v)|ca_(?:qcontent|qpos|kcontent|kpos|v|qpos_sine))_proj"
)
_COND_MLPS = r"(query_scale|ref_point_head)\.layers\.(\d+)\.(weight|bias)"

LAYOUTS = {
  "reference": [
    (rf"backbone\.0\.body\.{_TRUNK}", _SAME),
    (r"transformer\.(encoder|decoder)\.(layers\.\d+|norm)\.[\w.]+", _SAME),
    (r"input_proj\.(weight|bias)|query_embed\.weight|class_embed\.(weight|bias)", _SAME),
    (r"bbox_embed\.layers\.\d+\.(weight|bias)", _SAME),
    *_HEAD_REFERENCE,
  ],
  "seed": [
    (r"backbone\.0\.weight", BODY + "conv1.weight"),
    (r"backbone\.1\.(\w+)", BODY + r"bn1.\1"),
    (r"backbone\.([4-7])\.(\d+\.[\w.]+)", lambda m: f"{BODY}layer{int(m[1]) - 3}.{m[2]}"),
    (
      r"transformer\.encoder\.encoders\.(\d+)\.attn\.(q|k|v|proj)\.(weight|bias)",
      lambda m: f"transformer.encoder.layers.{m[1]}.self_attn.{_SEED_ATTN[m[2]]}.{m[3]}",
    ),
    (
      r"transformer\.decoder\.decoders\.(\d+)\.attn_(t|x)\.(q|k|v|proj)\.(weight|bias)",
      lambda m: (
        f"transformer.decoder.layers.{m[1]}."
        f"{'self_attn' if m[2] == 't' else 'multihead_attn'}.{_SEED_ATTN[m[3]]}.{m[4]}"
      ),
    ),
    (
      r"transformer\.(encoder|decoder)\.\1s\.(\d+)\.mlp\.fc([12])\.(weight|bias)",
      r"transformer.\1.layers.\2.linear\3.\4",
    ),
    (
      r"transformer\.(encoder|decoder)\.\1s\.(\d+)\.(norm[123])\.(weight|bias)",
      r"transformer.\1.layers.\2.\3.\4",
    ),
    (r"transformer\.decoder\.norm\.(weight|bias)|input_proj\.(weight|bias)", _SAME),
    (r"query_embed\.weight", _SAME),
    (r"class_layer\.(weight|bias)", r"class_embed.\1"),
    (
      r"box_layer\.box_layers\.([024])\.(weight|bias)",
      lambda m: f"bbox_embed.layers.{int(m[1]) // 2}.{m[2]}",
    ),
  ],
  "transformers": [
    (_HF_TRUNK + _TRUNK, BODY + r"\1"),
    (_HF_TRUNK + r"embedder\.embedder\.convolution\.weight", BODY + "conv1.weight"),
    (_HF_TRUNK + r"embedder\.embedder\.normalization\.(\w+)", BODY + r"bn1.\1"),
    (_HF_STAGE + r"layer\.([0-2])\.(convolution|normalization)\.(\w+)", _hf_native_block),
    (_HF_STAGE + r"shortcut\.(convolution|normalization)\.(\w+)", _hf_native_shortcut),
    (
      r"model\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)\."
      r"(q_proj|k_proj|v_proj|out_proj|o_proj)\.(weight|bias)",
      lambda m: (
        f"transformer.{m[1]}.layers.{m[2]}.{_HF_ATTN[m[3]]}."
        f"{'out_proj' if m[4] == 'o_proj' else m[4]}.{m[5]}"
      ),
    ),
    *_HF_FFN_AND_NORMS,
    *_HF_HEADS,
    *_HEAD_REFERENCE,
    *_HEAD_HF5,
  ],
  "torchvision": [
    (_TRUNK, BODY + r"\1"),
    (r"fc\.(weight|bias)", None),  # the ImageNet classifier is not part of DETR
  ],
  "conditional": [
    (rf"backbone\.0\.body\.{_TRUNK}", _SAME),
    (r"transformer\.encoder\.layers\.\d+\.[\w.]+", _SAME),
    (rf"transformer\.decoder\.layers\.\d+\.{_COND_DECODER_PROJ}\.(weight|bias)", _SAME),
    (r"transformer\.decoder\.layers\.\d+\.(self_attn|cross_attn)\.out_proj\.(weight|bias)", _SAME),
    (r"transformer\.decoder\.layers\.\d+\.(linear[12]|norm[123])\.(weight|bias)", _SAME),
    (rf"transformer\.decoder\.(norm\.(weight|bias)|{_COND_MLPS})", _SAME),
    (r"input_proj\.(weight|bias)|query_embed\.weight|class_embed\.(weight|bias)", _SAME),
    (r"bbox_embed\.layers\.\d+\.(weight|bias)", _SAME),
  ],
  "transformers_conditional": [
    (_HF_TRUNK + _TRUNK, BODY + r"\1"),
    (_HF_TRUNK + r"embedder\.embedder\.convolution\.weight", BODY + "conv1.weight"),
    (_HF_TRUNK + r"embedder\.embedder\.normalization\.(\w+)", BODY + r"bn1.\1"),
    (_HF_STAGE + r"layer\.([0-2])\.(convolution|normalization)\.(\w+)", _hf_native_block),
    (_HF_STAGE + r"shortcut\.(convolution|normalization)\.(\w+)", _hf_native_shortcut),
    (
      r"model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj|o_proj)\."
      r"(weight|bias)",
      lambda m: (
        f"transformer.encoder.layers.{m[1]}.self_attn."
        f"{'out_proj' if m[2] == 'o_proj' else m[2]}.{m[3]}"
      ),
    ),
    (
      rf"model\.decoder\.layers\.(\d+)\.({_COND_DECODER_PROJ})\.(weight|bias)",
      r"transformer.decoder.layers.\1.\2.\3",
    ),  # transformers 4 (the hub's file)
    (
      r"model\.decoder\.layers\.(\d+)\.(self_attn|encoder_attn)\.(\w+?)_proj\.(weight|bias)",
      _hf_conditional_proj,
    ),
    *_HF_FFN_AND_NORMS,
    (rf"model\.decoder\.{_COND_MLPS}", r"transformer.decoder.\1.layers.\2.\3"),
    *_HF_HEADS,
  ],
}
_NO_FIT = object()


def _rename(rules, key):
  """The reference name of `key` under `rules`, None to drop it, or _NO_FIT.

  A function replacement returns None when the match does not fit after all.
  """
  for pattern, repl in rules:
    m = re.fullmatch(pattern, key)
    if m is None:
      continue
    if repl is None:
      return None
    new = repl(m) if callable(repl) else m.expand(repl)
    return _NO_FIT if new is None else new
  return _NO_FIT


def _pack_qkv(state_dict):
  """`<attn>.{q,k,v}_proj.{weight,bias}` -> the reference's `<attn>.in_proj_{weight,bias}`.

  q, k, v ([D, D] weights, [D] biases) are stacked in that order along dim 0 ([3D, D], [3D]).
  An incomplete triple is left as it is (and reported as unexpected by the importer).
  """
  out, parts = {}, collections.defaultdict(dict)
  for key, value in state_dict.items():
    m = re.fullmatch(r"(.+)\.([qkv])_proj\.(weight|bias)", key)
    if m:
      parts[(m[1], m[3])][m[2]] = value
    else:
      out[key] = value
  for (base, kind), p in parts.items():
    if len(p) == 3:
      out[f"{base}.in_proj_{kind}"] = np.concatenate([p["q"], p["k"], p["v"]], axis=0)
    else:
      out.update({f"{base}.{w}_proj.{kind}": v for w, v in p.items()})
  return out


def normalize_state_dict(state_dict):
  """(layout name, the state dict under the reference key names) for any known layout.

  The layout is the first of `LAYOUTS` whose rules fit every key (`num_batches_tracked`
  counters aside, which are dropped; a `module.` prefix on every key, left by PyTorch's
  DataParallel, is removed; a segmentation model's `detr.` prefix of the box model is
  removed, its `bbox_attention.*` and `mask_head.*` keys come out under the reference's
  names). Values are passed through (q/k/v concatenated). Raises a ValueError naming the
  layouts tried and the first keys that did not fit each.
  """
  keys = [k for k in state_dict if not k.endswith("num_batches_tracked")]
  strip = len("module.") if keys and all(k.startswith("module.") for k in keys) else 0
  names = {k: k[strip:] for k in keys}
  if any(n.startswith(SEGM_PREFIX) for n in names.values()) and all(
    n.startswith((SEGM_PREFIX, *_HEAD_PREFIXES)) for n in names.values()
  ):
    names = {k: n.removeprefix(SEGM_PREFIX) for k, n in names.items()}
  misfits = {}
  for layout, rules in LAYOUTS.items():
    renamed, bad = {}, []
    for key in keys:
      new = _rename(rules, names[key])
      if new is _NO_FIT or new in renamed:  # a second key for one weight does not fit either
        bad.append(key)
      elif new is not None:
        renamed[new] = state_dict[key]
    if keys and not bad:
      return layout, _pack_qkv(renamed)
    misfits[layout] = bad[:3]
  if not keys:
    raise ValueError("The state dict holds no weights")
  lines = "\n".join(f"  {layout}: {', '.join(keys)}" for layout, keys in misfits.items())
  raise ValueError(
    f"The state dict fits none of the known layouts ({', '.join(LAYOUTS)}). "
    f"First keys that did not fit each:\n{lines}"
  )


def is_backbone_only(state_dict):
  """True for a reference-named state dict that holds only the ResNet trunk."""
  return bool(state_dict) and all(k.startswith(BODY) for k in state_dict)


def _read(path):
  """(layout, reference-named float32 state dict) of a weights file."""
  obj = torch_io.load(path)
  if isinstance(obj, dict):
    for name in ("model", "model_state_dict"):  # reference release, seed
      if isinstance(obj.get(name), dict):
        obj = obj[name]
        break
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
  for key, value in obj.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
  try:
    layout, state_dict = normalize_state_dict(obj)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  state_dict = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  logging.info("%s: %s layout, %d tensors", path, layout, len(state_dict))
  return layout, state_dict


def load_torch_checkpoint(path):
  """Reads a weights file of any known layout without torch and without running its code.

  `path`: a `.pth` / `.pth.tar` (a bare state dict, `{'model': ...}` or
  `{'model_state_dict': ...}`) or a `.safetensors` file. Returns a dict of reference key
  name -> float32 NumPy array (see `normalize_state_dict`).
  """
  return _read(path)[1]


def _linear(w):
  return w.T


def _conv(w):
  return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _identity(w):
  return w


def _qkv_slice(which, is_kernel):
  def f(w):
    d = w.shape[0] // 3
    part = w[which * d : (which + 1) * d]
    return part.T if is_kernel else part

  return f


def _backbone_key(collection, path):
  """Reference key (without the `backbone.0.body.` prefix) and transform for a backbone leaf."""
  mod, leaf = path[0], path[-1]
  if mod in ("conv1", "bn1"):
    base = mod
  else:
    layer, j = mod.split("_")
    sub = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(path[1], path[1])
    base = f"{layer}.{j}.{sub}"
  if collection == "batch_stats":
    return f"{base}.{_BN_NAMES[leaf]}", _identity
  return f"{base}.weight", _conv


def _linear_key(base, leaf):
  """(`base.weight` or `base.bias`, transform) of a Dense kernel or bias."""
  if leaf == "kernel":
    return f"{base}.weight", _linear
  return f"{base}.bias", _identity


def _transformer_key(path):
  mod = path[0]
  m = re.fullmatch(r"(encoder|decoder)_layer(\d+)", mod)
  if mod in ("query_scale", "ref_point_head"):  # Conditional DETR's decoder MLPs
    i = path[1].split("_")[1]
    return _linear_key(f"transformer.decoder.{mod}.layers.{i}", path[-1])
  if m is None:
    base = {"encoder_norm": "transformer.encoder.norm", "decoder_norm": "transformer.decoder.norm"}[
      mod
    ]
    return f"{base}.{'weight' if path[-1] == 'scale' else 'bias'}", _identity
  base = f"transformer.{m.group(1)}.layers.{m.group(2)}"
  sub, leaf = path[1], path[-1]
  if sub.startswith(("sa_", "ca_")):  # Conditional DETR's decoder projections
    return _linear_key(f"{base}.{sub}", leaf)
  if sub in ("self_attn", "multihead_attn", "cross_attn"):
    proj = path[2]
    if proj in _QKV:
      name = "in_proj_weight" if leaf == "kernel" else "in_proj_bias"
      return f"{base}.{sub}.{name}", _qkv_slice(_QKV[proj], leaf == "kernel")
    return f"{base}.{sub}.out_proj.{'weight' if leaf == 'kernel' else 'bias'}", (
      _linear if leaf == "kernel" else _identity
    )
  if sub == "linear":
    return f"{base}.{path[2]}.{'weight' if leaf == 'kernel' else 'bias'}", (
      _linear if leaf == "kernel" else _identity
    )
  return f"{base}.{sub}.{'weight' if leaf == 'scale' else 'bias'}", _identity


def reference_key(collection, path):
  """(reference state-dict key, torch -> flax transform) for one of our variables.

  Args:
    collection: "params" or "batch_stats"; path: the variable's path inside it.
  """
  top, rest = path[0], path[1:]
  if top == "backbone":
    key, fn = _backbone_key(collection, rest)
    return "backbone.0.body." + key, fn
  if top == "transformer":
    return _transformer_key(rest)
  if top == "query_embed":
    return "query_embed.weight", _identity
  leaf = path[-1]
  name = "weight" if leaf == "kernel" else "bias"
  if top == "input_proj":
    return f"input_proj.{name}", _conv if leaf == "kernel" else _identity
  if top == "class_embed":
    return f"class_embed.{name}", _linear if leaf == "kernel" else _identity
  if top == "bbox_embed":
    i = path[1].split("_")[1]
    return f"bbox_embed.layers.{i}.{name}", _linear if leaf == "kernel" else _identity
  if top == "bbox_attention":  # q_linear, k_linear
    return f"bbox_attention.{path[1]}.{name}", _linear if leaf == "kernel" else _identity
  if top == "mask_head":  # lay*, adapter*, out_lay (kernel, bias); gn* (scale, bias)
    if leaf == "scale":
      name = "weight"
    return f"mask_head.{path[1]}.{name}", _conv if leaf == "kernel" else _identity
  raise KeyError(f"No reference key for {collection}/{'/'.join(path)}")


def _import(state_dict, abstract, layout, keep=lambda collection, path: True):
  """Fills the leaves of `abstract` chosen by `keep` from a reference-named `state_dict`.

  Errors list every missing, unexpected and mis-shaped key (reference names; `layout` is the
  layout the state dict came in, named in the message).
  """
  flat = {}
  used, missing, misshaped = set(), [], []
  for collection, tree in abstract.items():
    for path, leaf in flax.traverse_util.flatten_dict(tree).items():
      if not keep(collection, path):
        continue
      key, fn = reference_key(collection, path)
      if key not in state_dict:
        missing.append(key)
        continue
      used.add(key)
      value = np.asarray(fn(np.asarray(state_dict[key], np.float32)), np.float32)
      if value.shape != tuple(leaf.shape):
        misshaped.append(f"{key}: got {np.shape(state_dict[key])}, expected {leaf.shape} (ours)")
        continue
      flat[(collection, *path)] = value
  unexpected = sorted(k for k in state_dict if k not in used)
  if missing or unexpected or misshaped:
    lines = []
    for title, keys in (
      ("missing", sorted(set(missing))),
      ("unexpected", unexpected),
      ("mis-shaped", misshaped),
    ):
      if keys:
        lines.append(f"{len(keys)} {title} keys:\n  " + "\n  ".join(keys))
    raise ValueError(
      f"State dict ({layout} layout; keys named as in the reference) does not match the model "
      "config.\n" + "\n".join(lines)
    )
  return flat


def torch_to_flax(state_dict, model_config):
  """A full DETR state dict in any layout -> `{"params", "batch_stats"}` for `build_model`.

  state_dict: name -> array (torch layout: linear weights [out, in], convs OIHW), in any of
  `LAYOUTS`. Any extra, missing or mis-shaped key raises a ValueError that lists them all; a
  backbone-only state dict raises one that points to `torchvision_resnet_to_flax`.
  """
  layout, state_dict = normalize_state_dict(state_dict)
  if is_backbone_only(state_dict):
    raise ValueError(
      f"The state dict ({layout} layout) holds only a ResNet backbone: initialize the model and "
      "use torchvision_resnet_to_flax (the convert CLI does this by itself)"
    )
  abstract = models.abstract_variables(models.build_model(model_config))
  try:
    flat = _import(state_dict, abstract, layout)
  except ValueError as e:
    has_head = any(k.startswith(_HEAD_PREFIXES) for k in state_dict)
    if has_head == bool(model_config.masks):
      raise
    hint = (
      "The state dict is a segmentation model (DETRsegm: bbox_attention.* and mask_head.* "
      "keys) but config.model.masks=False: set config.model.masks=True"
      if has_head
      else "The state dict is a box-only DETR (no bbox_attention.* or mask_head.* keys) but "
      "config.model.masks=True: convert it with masks=False, or start a segmentation run "
      "from its workdir with config.init_from (the mask head starts random)"
    )
    raise ValueError(f"{e}\n{hint}") from None
  return flax.traverse_util.unflatten_dict(flat)


def torchvision_resnet_to_flax(state_dict, variables, model_config):
  """Replaces the backbone in `variables` by the weights of a backbone-only state dict.

  state_dict: a ResNet trunk in any layout, typically torchvision's ImageNet ResNet
  (`conv1.weight`, `layer1.0.bn1.running_mean`, ...; `fc.*` and `num_batches_tracked` are
  dropped). Returns new variables (NumPy leaves); the rest of `variables` is kept as it is.
  """
  del model_config  # the backbone layout is read off `variables`
  layout, state_dict = normalize_state_dict(state_dict)
  if not is_backbone_only(state_dict):
    others = [k for k in state_dict if not k.startswith(BODY)]
    raise ValueError(
      f"The state dict ({layout} layout) is not backbone-only ({len(others)} other keys, e.g. "
      f"{others[0]}): use torch_to_flax, or keep only its backbone keys"
    )
  flat = _import(
    state_dict,
    jax.eval_shape(lambda: variables),
    layout,
    keep=lambda collection, path: path[0] == "backbone",
  )
  out = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, variables))
  out.update(flat)
  return flax.traverse_util.unflatten_dict(out)


def merge_pretrained(pretrained, initialized, reinit=("class_embed",)):
  """Variables for fine-tuning: `pretrained` everywhere except mis-shaped `reinit` modules.

  A module named in `reinit` (the class head) whose shape differs is taken from
  `initialized`, and so is the segmentation head (`models.MASK_HEAD_MODULES`) when only
  `initialized` has one (a segmentation model started from a box model: stage 2 of the
  reference's recipe); any other structural or shape difference raises a ValueError listing
  it. Returns (variables, list of re-initialized paths).
  """
  pre = flax.traverse_util.flatten_dict(pretrained)
  ini = flax.traverse_util.flatten_dict(initialized)
  problems, reinitialized, out = [], [], {}
  for path in sorted(set(pre) | set(ini)):
    name = "/".join(path)
    if path not in pre and path[1] in models.MASK_HEAD_MODULES:
      out[path] = ini[path]
      reinitialized.append(name)
    elif path not in pre or path not in ini:
      problems.append(f"{name}: only in {'initialized' if path in ini else 'pretrained'}")
    elif np.shape(pre[path]) == np.shape(ini[path]):
      out[path] = pre[path]
    elif path[1] in reinit:
      out[path] = ini[path]
      reinitialized.append(name)
    else:
      problems.append(f"{name}: pretrained {np.shape(pre[path])} vs {np.shape(ini[path])}")
  if problems:
    raise ValueError("Pretrained variables do not fit the model:\n  " + "\n  ".join(problems))
  return flax.traverse_util.unflatten_dict(out), reinitialized


def parser():
  """The command line of `python -m detr_jax.convert`."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "checkpoint",
    help="a .pth / .pth.tar / .safetensors file or its URL: reference DETR release, seed "
    "checkpoint, transformers DETR, torchvision ResNet, original or transformers Conditional "
    "DETR (layout detected from the keys)",
  )
  p.add_argument("--config", required=True, help="config file, e.g. configs/coco_500ep.py")
  p.add_argument("--workdir", required=True, help="where to write the converted checkpoint")
  p.add_argument(
    "--backbone_only",
    action="store_true",
    help="take only the backbone of the file and initialize the rest randomly (implied for a "
    "backbone-only file such as a torchvision ResNet)",
  )
  return p


def main(argv=None):
  """CLI: convert a weights file of any layout into a detr_jax workdir checkpoint (step 0)."""
  from detr_jax import checkpoint, config_utils

  args = parser().parse_args(argv)
  config = config_utils.load_config_file(args.config)
  path = pretrained.fetch(args.checkpoint)
  layout, state_dict = _read(path)
  if args.backbone_only:
    state_dict = {k: v for k, v in state_dict.items() if k.startswith(BODY)}
  if is_backbone_only(state_dict):
    model = models.build_model(config.model)
    variables = models.init_variables(model, jax.random.key(config.seed))
    variables = torchvision_resnet_to_flax(state_dict, variables, config.model)
    what = "backbone"
  else:
    variables = torch_to_flax(state_dict, config.model)
    what = "model"
  checkpoint.write_variables(args.workdir, variables, config)
  n = models.count_params(variables["params"])
  print(f"Wrote {n:,} parameters ({what} from {path}, {layout} layout) to {args.workdir}")


if __name__ == "__main__":
  main()
