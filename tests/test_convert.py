"""Weight import: every checkpoint layout without torch, reference key layout, clear errors, CLI,
fine-tuning."""

import argparse
import collections
import functools
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import torch_detr

from configs import base
from detr_jax import backbone, checkpoint, convert, models

K = 7
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _small():
  hf = torch_detr.build_hf_detr(num_labels=K, seed=3, small=True)
  return hf, torch_detr.reference_state_dict(hf)


def _save_pth(path, sd, **extra):
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, **extra}, path)


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
  path = str(tmp_path / "evil.pth")
  torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
  with pytest.raises(ValueError, match="evil.pth.*'posix.system'.*never executed"):
    convert.load_torch_checkpoint(path)


def test_missing_unexpected_and_misshaped_keys_are_all_listed():
  _, sd = _small()
  bad = dict(sd)
  del bad["query_embed.weight"]
  bad["transformer.decoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
  bad["class_embed.weight"] = np.zeros((K + 2, 64), np.float32)
  with pytest.raises(ValueError) as e:
    convert.torch_to_flax(bad, torch_detr.small_model_config(K))
  msg = str(e.value)
  assert "1 missing keys" in msg and "query_embed.weight" in msg
  assert "1 unexpected keys" in msg and "transformer.decoder.layers.0.extra.weight" in msg
  assert "1 mis-shaped keys" in msg and "class_embed.weight" in msg


def test_torchvision_resnet_initializes_only_the_backbone():
  _, sd = _small()
  prefix = "backbone.0.body."
  tv = {k[len(prefix) :]: v + 1.0 for k, v in sd.items() if k.startswith(prefix)}
  tv["fc.weight"] = np.zeros((1000, 512), np.float32)
  tv["fc.bias"] = np.zeros(1000, np.float32)
  tv["bn1.num_batches_tracked"] = np.zeros((), np.float32)
  config = torch_detr.small_model_config(K)
  model = models.build_model(config)
  shapes = models.abstract_variables(model)
  variables = jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), shapes)
  out = convert.torchvision_resnet_to_flax(tv, variables, config)
  np.testing.assert_array_equal(
    out["params"]["backbone"]["layer2_1"]["conv2"]["kernel"],
    np.transpose(tv["layer2.1.conv2.weight"], (2, 3, 1, 0)),
  )
  np.testing.assert_array_equal(out["batch_stats"]["backbone"]["bn1"]["var"], tv["bn1.running_var"])
  np.testing.assert_array_equal(out["params"]["query_embed"], variables["params"]["query_embed"])
  del tv["layer1.0.conv1.weight"]
  with pytest.raises(ValueError, match="layer1.0.conv1.weight"):
    convert.torchvision_resnet_to_flax(tv, variables, config)


def test_cli_writes_a_checkpoint_that_restores(tmp_path):
  _, sd = _small()
  pth = str(tmp_path / "detr.pth")
  _save_pth(pth, sd)
  config_file = tmp_path / "small.py"
  config_file.write_text(
    "import torch_detr\n"
    "from configs import base\n"
    "def get_config():\n"
    "  c = base.get_config()\n"
    f"  c.model = torch_detr.small_model_config({K})\n"
    "  c.image_size = (96, 128)\n"
    "  return c\n"
  )
  workdir = str(tmp_path / "work")
  convert.main([pth, "--config", str(config_file), "--workdir", workdir])
  config = checkpoint.load_config(workdir)
  assert config.model.num_classes == K and list(config.image_size) == [96, 128]
  expected = convert.torch_to_flax(sd, config.model)
  manager = checkpoint.create_manager(workdir, read_only=True)
  assert manager.latest_step() == 0
  abstract = jax.eval_shape(lambda: expected)
  restored = checkpoint.restore(manager, 0, variables=abstract)
  assert restored["meta"]["step"] == 0
  jax.tree.map(np.testing.assert_array_equal, restored["variables"], expected)


def test_finetuning_merge_keeps_everything_but_the_class_head():
  _, sd = _small()
  pretrained = convert.torch_to_flax(sd, torch_detr.small_model_config(K))
  config = torch_detr.small_model_config(3)
  initialized = models.init_variables(models.build_model(config), jax.random.key(1))
  merged, reinit = convert.merge_pretrained(pretrained, initialized)
  assert reinit == ["params/class_embed/bias", "params/class_embed/kernel"]
  assert merged["params"]["class_embed"]["kernel"].shape == (64, 4)
  np.testing.assert_array_equal(
    merged["params"]["transformer"]["decoder_norm"]["scale"],
    pretrained["params"]["transformer"]["decoder_norm"]["scale"],
  )
  np.testing.assert_array_equal(
    merged["batch_stats"]["backbone"]["bn1"]["mean"],
    pretrained["batch_stats"]["backbone"]["bn1"]["mean"],
  )
  other = torch_detr.small_model_config(K)
  other.num_queries = 5
  wrong = models.init_variables(models.build_model(other), jax.random.key(1))
  with pytest.raises(ValueError, match="query_embed"):
    convert.merge_pretrained(pretrained, wrong)


# ---- Every layout, written by the model that owns it, imported without torch -------------------

_NO_TORCH_IMPORT = """
import json, sys
sys.modules["torch"] = None  # any `import torch` from here on raises ImportError
import flax, jax, numpy as np
from configs import base
from detr_jax import convert, models

job = json.loads(sys.argv[1])
config = base.get_model_config()
config.update(job["overrides"])
for name, path in job["files"].items():
  state_dict = convert.load_torch_checkpoint(path)
  if convert.is_backbone_only(state_dict):
    model = models.build_model(config)
    shapes = models.abstract_variables(model)
    variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    variables = convert.torchvision_resnet_to_flax(state_dict, variables, config)
  else:
    variables = convert.torch_to_flax(state_dict, config)
  np.savez(f"{job['out']}/{name}.npz", **flax.traverse_util.flatten_dict(variables, sep="/"))
convert.main(job["cli"])  # python -m detr_jax.convert
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
assert loaded == ["torch"] and sys.modules["torch"] is None, loaded
"""


@pytest.fixture(scope="module")
def layout_files(tmp_path_factory):
  """Each layout written from random weights by the model that owns it: name -> path."""
  d = tmp_path_factory.mktemp("layouts")
  hf, sd = _small()
  files = {"reference": str(d / "detr-small.pth")}
  # The reference release stores its argparse Namespace next to the weights.
  _save_pth(files["reference"], sd, args=argparse.Namespace(lr=1e-4, backbone="resnet18"))
  # The seed: its names, and its optimizer and scheduler state beside them.
  param = torch.nn.Parameter(torch.ones(3))
  optimizer = torch.optim.AdamW([param], lr=1e-4, weight_decay=1e-4)
  param.grad = torch.ones(3)
  optimizer.step()
  scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=400, gamma=0.1)
  files["seed"] = str(d / "detr_coco.best.pth.tar")
  seed_sd = collections.OrderedDict(
    (k, torch.from_numpy(v)) for k, v in torch_detr.seed_state_dict(sd).items()
  )
  torch.save(
    {
      "epoch": 3,
      "model_state_dict": seed_sd,
      "optimizer_state_dict": optimizer.state_dict(),
      "scheduler_state_dict": scheduler.state_dict(),
    },
    files["seed"],
  )
  # transformers: save_pretrained writes the model hub's names (transformers 4 layout) ...
  hf.save_pretrained(str(d / "hf"))
  files["transformers_hub"] = str(d / "hf" / "model.safetensors")
  # ... and the modules' own names (transformers 5) ...
  files["transformers_modules"] = str(d / "detr_modules.safetensors")
  safetensors.torch.save_file(hf.state_dict(), files["transformers_modules"])
  # ... and the hub's facebook/detr-resnet-50 names its timm backbone like torchvision (and
  # keeps the int64 counters of the downsample BatchNorms).
  hub = safetensors.torch.load_file(files["transformers_hub"])
  timm = {k: v for k, v in hub.items() if not k.startswith("model.backbone.")}
  body, prefix = "backbone.0.body.", "model.backbone.conv_encoder.model."
  for k, v in sd.items():
    if k.startswith(body):
      timm[prefix + k[len(body) :]] = torch.from_numpy(v)
  for i in range(2, 5):  # ResNet-18's layer1 has no downsample
    timm[f"{prefix}layer{i}.0.downsample.1.num_batches_tracked"] = torch.tensor(0)
  files["transformers_timm"] = str(d / "detr_timm.safetensors")
  safetensors.torch.save_file(timm, files["transformers_timm"])
  tv_sd, tv_features = torch_detr.torchvision_resnet18(seed=5)
  files["torchvision"] = str(d / "resnet18.pth")
  torch.save(tv_sd, files["torchvision"])
  return files, tv_sd, tv_features


@pytest.fixture(scope="module")
def imported_without_torch(layout_files, tmp_path_factory):
  """Runs every conversion in a subprocess where torch cannot be imported: name -> variables."""
  files, _, _ = layout_files
  out = tmp_path_factory.mktemp("imported")
  cli = [files["seed"], "--config", _small_config_file(out), "--workdir", str(out / "seed_cli")]
  job = {
    "files": files,
    "out": str(out),
    "overrides": torch_detr.small_model_overrides(K),
    "cli": cli,
  }
  subprocess.run(
    [sys.executable, "-c", _NO_TORCH_IMPORT, json.dumps(job)],
    cwd=REPO,
    check=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  result = {"seed_cli_workdir": str(out / "seed_cli")}
  for name in files:
    with np.load(out / f"{name}.npz") as z:
      result[name] = flax.traverse_util.unflatten_dict(dict(z), sep="/")
  return result


@functools.cache
def _reference_outputs():
  hf, _ = _small()
  images = np.random.default_rng(1).normal(size=(2, 64, 96, 3)).astype(np.float32)
  return images, *torch_detr.hf_outputs(hf, images)


@pytest.mark.parametrize(
  "layout", ["reference", "seed", "transformers_hub", "transformers_modules", "transformers_timm"]
)
def test_every_detr_layout_imports_without_torch_and_matches_its_model(
  imported_without_torch, layout
):
  variables = imported_without_torch[layout]
  images, ref_logits, ref_boxes = _reference_outputs()
  out = models.build_model(torch_detr.small_model_config(K)).apply(variables, images)
  np.testing.assert_allclose(out["pred_logits"], ref_logits[-1], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["pred_boxes"], ref_boxes[-1], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["aux_outputs"][0]["pred_logits"], ref_logits[0], atol=1e-4)
  # Same weights, same variables, whatever the layout.
  jax.tree.map(np.testing.assert_array_equal, variables, imported_without_torch["reference"])


def test_cli_converts_without_torch(imported_without_torch):
  workdir = imported_without_torch["seed_cli_workdir"]
  expected = imported_without_torch["seed"]
  manager = checkpoint.create_manager(workdir, read_only=True)
  restored = checkpoint.restore(manager, 0, variables=jax.eval_shape(lambda: expected))
  jax.tree.map(np.testing.assert_array_equal, restored["variables"], expected)


def test_torchvision_resnet_imports_without_torch_and_matches_its_features(
  layout_files, imported_without_torch
):
  _, _, features = layout_files
  variables = imported_without_torch["torchvision"]
  images = np.random.default_rng(2).normal(size=(2, 64, 96, 3)).astype(np.float32)
  trainable = ("layer2", "layer3", "layer4")
  ours = backbone.ResNet("resnet18", False, trainable, jnp.float32, False, "auto").apply(
    {
      "params": variables["params"]["backbone"],
      "batch_stats": variables["batch_stats"]["backbone"],
    },
    images,
  )
  with torch.no_grad():
    ref = features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  assert ours.shape == (2, 2, 3, 512) and np.abs(ref).max() > 0.1
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


def test_layouts_are_detected_and_read_like_torch_load(layout_files):
  files, tv_sd, _ = layout_files
  _, sd = _small()
  assert sorted(convert.load_torch_checkpoint(files["seed"])) == sorted(sd)
  for layout in ("reference", "seed", "transformers", "torchvision"):
    assert layout in convert.LAYOUTS
  tv = convert.load_torch_checkpoint(files["torchvision"])
  assert convert.is_backbone_only(tv)
  expected = {
    "backbone.0.body." + k: v.numpy()
    for k, v in tv_sd.items()
    if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))
  }
  assert sorted(tv) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(tv[k], v)


def test_seed_r50_names_map_to_all_458_reference_keys():
  model = models.build_model(base.get_model_config())
  abstract = models.abstract_variables(model)
  keys = {
    convert.reference_key(collection, path)[0]
    for collection, tree in abstract.items()
    for path in flax.traverse_util.flatten_dict(tree)
  }
  assert len(keys) == 458
  seed = torch_detr.seed_state_dict({k: np.zeros(6, np.float32) for k in keys})
  assert len(seed) == 530  # seed-layout.md
  for prefix in ("", "module."):  # DataParallel prefixes every key
    layout, back = convert.normalize_state_dict({prefix + k: v for k, v in seed.items()})
    assert layout == "seed" and sorted(back) == sorted(keys)


def test_a_file_in_no_known_layout_names_the_layouts_and_first_misfits(tmp_path):
  _, sd = _small()
  path = str(tmp_path / "other.pth")
  odd = {"detector.head.weight": sd["class_embed.weight"], **sd}
  _save_pth(path, odd)
  with pytest.raises(ValueError) as e:
    convert.load_torch_checkpoint(path)
  msg = str(e.value)
  assert "other.pth" in msg
  for layout in convert.LAYOUTS:
    assert f"  {layout}: detector.head.weight" in msg


def test_backbone_only_state_dicts_are_pointed_to_the_backbone_import(layout_files):
  files, _, _ = layout_files
  tv = convert.load_torch_checkpoint(files["torchvision"])
  with pytest.raises(ValueError, match="only a ResNet backbone.*torchvision_resnet_to_flax"):
    convert.torch_to_flax(tv, torch_detr.small_model_config(K))


def _small_config_file(tmp_path):
  """A config file for the small model that does not import torch."""
  config_file = tmp_path / "small.py"
  config_file.write_text(
    "from configs import base\n"
    "def get_config():\n"
    "  c = base.get_config()\n"
    f"  c.model.update({torch_detr.small_model_overrides(K)!r})\n"
    "  c.image_size = (64, 96)\n"
    "  return c\n"
  )
  return str(config_file)


def test_cli_detects_a_backbone_only_file(layout_files, imported_without_torch, tmp_path):
  files, _, _ = layout_files
  config_file = _small_config_file(tmp_path)
  restored = {}
  # A torchvision file is detected as backbone-only; --backbone_only takes a DETR's backbone.
  for name, extra in (("torchvision", []), ("seed", ["--backbone_only"])):
    workdir = str(tmp_path / name)
    convert.main([files[name], "--config", config_file, "--workdir", workdir, *extra])
    model = models.build_model(checkpoint.load_config(workdir).model)
    abstract = models.abstract_variables(model)
    manager = checkpoint.create_manager(workdir, read_only=True)
    restored[name] = checkpoint.restore(manager, 0, variables=abstract)["variables"]
    for collection in ("params", "batch_stats"):
      jax.tree.map(
        np.testing.assert_array_equal,
        restored[name][collection]["backbone"],
        imported_without_torch[name][collection]["backbone"],
      )
  # The rest is initialized from config.seed: the same in both, not the seed file's.
  jax.tree.map(
    np.testing.assert_array_equal,
    restored["torchvision"]["params"]["transformer"],
    restored["seed"]["params"]["transformer"],
  )
  assert not np.array_equal(
    restored["seed"]["params"]["query_embed"],
    imported_without_torch["seed"]["params"]["query_embed"],
  )
