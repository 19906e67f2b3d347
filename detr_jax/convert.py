"""Weight import from the reference PyTorch DETR release and torchvision ResNets.

- `load_torch_checkpoint(path)`: a `.pth` state dict, read with `torch.load(weights_only=True)`
  so no pickled code runs (the reference's `args` Namespace is the one class allowed).
- `torch_to_flax(state_dict, model_config)`: the variables `model.apply` takes. Every
  expected key must be present with the right shape and every key must be used: otherwise a
  `ValueError` lists the missing, unexpected and mis-shaped keys.
- `torchvision_resnet_to_flax(state_dict, variables, model_config)`: ImageNet backbone
  initialization from a torchvision ResNet checkpoint (`fc.*` ignored).
- `merge_pretrained(pretrained, initialized)`: fine-tuning with another class count keeps
  everything but the class head.

CLI (writes a checkpoint that `eval.py --workdir DIR` evaluates):
  python -m detr_jax.convert CHECKPOINT.pth --config configs/coco_500ep.py --workdir DIR
"""

import argparse
import re

import flax
import jax
import numpy as np

from detr_jax import models

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def load_torch_checkpoint(path):
  """Reads a PyTorch checkpoint without executing pickled code.

  Accepts a bare state dict or a dict with a `model` entry (the reference release format).
  Returns a dict of name -> float32 NumPy array.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError("Reading .pth files needs torch: pip install 'detr_jax[torch]'") from e
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(
      f"{path}: cannot be read as a weights-only PyTorch checkpoint (it may contain pickled "
      f"code, which detr_jax never executes): {e}"
    ) from e
  if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
    obj = obj["model"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "numpy"):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = v.detach().float().numpy()
  return out


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


def _transformer_key(path):
  mod = path[0]
  m = re.fullmatch(r"(encoder|decoder)_layer(\d+)", mod)
  if m is None:
    base = {"encoder_norm": "transformer.encoder.norm", "decoder_norm": "transformer.decoder.norm"}[
      mod
    ]
    return f"{base}.{'weight' if path[-1] == 'scale' else 'bias'}", _identity
  base = f"transformer.{m.group(1)}.layers.{m.group(2)}"
  sub, leaf = path[1], path[-1]
  if sub in ("self_attn", "multihead_attn"):
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
  raise KeyError(f"No reference key for {collection}/{'/'.join(path)}")


def _import(
  state_dict,
  abstract,
  keep=lambda collection, path: True,
  key_fn=reference_key,
  ignore=lambda key: False,
):
  """Fills the leaves of `abstract` chosen by `keep` from `state_dict`; errors list all problems."""
  flat = {}
  used, missing, misshaped = set(), [], []
  for collection, tree in abstract.items():
    for path, leaf in flax.traverse_util.flatten_dict(tree).items():
      if not keep(collection, path):
        continue
      key, fn = key_fn(collection, path)
      if key not in state_dict:
        missing.append(key)
        continue
      used.add(key)
      value = np.asarray(fn(np.asarray(state_dict[key], np.float32)), np.float32)
      if value.shape != tuple(leaf.shape):
        misshaped.append(f"{key}: got {np.shape(state_dict[key])}, expected {leaf.shape} (ours)")
        continue
      flat[(collection, *path)] = value
  unexpected = sorted(k for k in state_dict if k not in used and not ignore(k))
  if missing or unexpected or misshaped:
    lines = []
    for title, keys in (
      ("missing", sorted(set(missing))),
      ("unexpected", unexpected),
      ("mis-shaped", misshaped),
    ):
      if keys:
        lines.append(f"{len(keys)} {title} keys:\n  " + "\n  ".join(keys))
    raise ValueError("State dict does not match the model config.\n" + "\n".join(lines))
  return flat


def torch_to_flax(state_dict, model_config):
  """Reference DETR state dict -> `{"params", "batch_stats"}` for `build_model(model_config)`.

  `num_batches_tracked` entries are ignored; any other extra, missing or mis-shaped key
  raises a ValueError that lists them all.
  """
  abstract = models.abstract_variables(models.build_model(model_config))
  flat = _import(state_dict, abstract, ignore=lambda k: k.endswith("num_batches_tracked"))
  return flax.traverse_util.unflatten_dict(flat)


def torchvision_resnet_to_flax(state_dict, variables, model_config):
  """Replaces the backbone in `variables` by a torchvision ImageNet ResNet's weights.

  `state_dict` has torchvision keys (`conv1.weight`, `layer1.0.bn1.running_mean`, ...);
  `fc.*` and `num_batches_tracked` are ignored. Returns new variables.
  """
  abstract = jax.eval_shape(lambda: variables)
  del model_config  # the backbone layout is read off `variables`

  def key_fn(collection, path):
    return _backbone_key(collection, path[1:])

  flat = _import(
    state_dict,
    abstract,
    keep=lambda collection, path: path[0] == "backbone",
    key_fn=key_fn,
    ignore=lambda k: k.startswith("fc.") or k.endswith("num_batches_tracked"),
  )
  out = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, variables))
  out.update(flat)
  return flax.traverse_util.unflatten_dict(out)


def merge_pretrained(pretrained, initialized, reinit=("class_embed",)):
  """Variables for fine-tuning: `pretrained` everywhere except mis-shaped `reinit` modules.

  A module named in `reinit` (the class head) whose shape differs is taken from
  `initialized`; any other structural or shape difference raises a ValueError listing it.
  Returns (variables, list of re-initialized paths).
  """
  pre = flax.traverse_util.flatten_dict(pretrained)
  ini = flax.traverse_util.flatten_dict(initialized)
  problems, reinitialized, out = [], [], {}
  for path in sorted(set(pre) | set(ini)):
    name = "/".join(path)
    if path not in pre or path not in ini:
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


def main(argv=None):
  """CLI: convert a reference .pth into a detr_jax workdir checkpoint (step 0)."""
  from detr_jax import checkpoint, config_utils

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "checkpoint", help="reference DETR .pth (or torchvision ResNet with --backbone_only)"
  )
  parser.add_argument("--config", required=True, help="config file, e.g. configs/coco_500ep.py")
  parser.add_argument("--workdir", required=True, help="where to write the converted checkpoint")
  parser.add_argument(
    "--backbone_only",
    action="store_true",
    help="the file is a torchvision ResNet: initialize the backbone, the rest randomly",
  )
  args = parser.parse_args(argv)
  config = config_utils.load_config_file(args.config)
  state_dict = load_torch_checkpoint(args.checkpoint)
  if args.backbone_only:
    model = models.build_model(config.model)
    variables = models.init_variables(model, jax.random.key(config.seed), tuple(config.image_size))
    variables = torchvision_resnet_to_flax(state_dict, variables, config.model)
  else:
    variables = torch_to_flax(state_dict, config.model)
  checkpoint.write_variables(args.workdir, variables, config)
  n = models.count_params(variables["params"])
  print(f"Wrote {n:,} parameters from {args.checkpoint} to {args.workdir}")


if __name__ == "__main__":
  main()
