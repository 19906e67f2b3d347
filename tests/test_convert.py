"""Weight import: reference key layout, safe .pth loading, clear errors, CLI, fine-tuning."""

import argparse
import functools
import os

import jax
import numpy as np
import pytest
import torch
import torch_detr

from detr_jax import checkpoint, convert, models

K = 7


@functools.cache
def _small():
  hf = torch_detr.build_hf_detr(num_labels=K, seed=3, small=True)
  return hf, torch_detr.reference_state_dict(hf)


def _save_pth(path, sd, **extra):
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, **extra}, path)


def test_small_model_import_matches_transformers(tmp_path):
  hf, sd = _small()
  path = str(tmp_path / "detr.pth")
  # The reference release stores its argparse Namespace next to the weights.
  _save_pth(path, sd, args=argparse.Namespace(lr=1e-4), epoch=499)
  loaded = convert.load_torch_checkpoint(path)
  assert sorted(loaded) == sorted(sd)
  config = torch_detr.small_model_config(K)
  variables = convert.torch_to_flax(loaded, config)
  images = np.random.default_rng(0).normal(size=(2, 96, 160, 3)).astype(np.float32)
  ref_logits, ref_boxes = torch_detr.hf_outputs(hf, images)
  out = models.build_model(config).apply(variables, images)
  np.testing.assert_allclose(out["pred_logits"], ref_logits[-1], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["pred_boxes"], ref_boxes[-1], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["aux_outputs"][0]["pred_logits"], ref_logits[0], atol=1e-4)


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
  path = str(tmp_path / "evil.pth")
  torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
  with pytest.raises(ValueError, match="evil.pth.*pickled code"):
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
  variables = models.init_variables(model, jax.random.key(0), (64, 64))
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
  initialized = models.init_variables(models.build_model(config), jax.random.key(1), (64, 64))
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
  wrong = models.init_variables(models.build_model(other), jax.random.key(1), (64, 64))
  with pytest.raises(ValueError, match="query_embed"):
    convert.merge_pretrained(pretrained, wrong)
