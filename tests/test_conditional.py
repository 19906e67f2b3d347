"""Conditional DETR (`model.decoder="conditional"`): parity with transformers' PyTorch
ConditionalDetrForObjectDetection for the same random weights, imported from each of its
layouts, and the parameter count of the R50 model."""

import functools

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch_conditional_detr
import torch_detr

from configs import base
from detr_jax import conditional, convert, models

K = 7


def _small_config(num_labels=K):
  """Our `config.model` of `torch_conditional_detr.build_hf_conditional_detr`."""
  config = torch_detr.small_model_config(num_labels)
  config.decoder = "conditional"
  config.classifier = "sigmoid"
  return config


@functools.cache
def _hf():
  model = torch_conditional_detr.build_hf_conditional_detr(K, seed=3)
  return model, torch_conditional_detr.state_dict(model)


@functools.cache
def _parity():
  hf, sd = _hf()
  images = np.random.default_rng(0).normal(size=(2, 128, 192, 3)).astype(np.float32)
  ref_logits, ref_boxes = torch_conditional_detr.hf_outputs(hf, images)  # 4 x 6 grid
  return images, ref_logits, ref_boxes


def test_outputs_match_transformers_conditional_detr():
  _, sd = _hf()
  images, ref_logits, ref_boxes = _parity()
  config = _small_config()
  variables = convert.torch_to_flax(sd, config)
  out = jax.jit(models.build_model(config).apply)(variables, images)
  assert out["pred_logits"].shape == (2, 10, K) and out["pred_boxes"].shape == (2, 10, 4)
  assert len(out["aux_outputs"]) == 1
  assert np.abs(ref_logits).max() > 1.0 and ref_boxes.std() > 0.05  # a meaningful comparison
  np.testing.assert_allclose(out["pred_logits"], ref_logits[-1], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["pred_boxes"], ref_boxes[-1], atol=1e-4, rtol=0)
  aux = out["aux_outputs"][0]
  np.testing.assert_allclose(aux["pred_logits"], ref_logits[0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(aux["pred_boxes"], ref_boxes[0], atol=1e-4, rtol=0)


def test_hub_and_original_release_layouts_import_the_same_weights(tmp_path):
  """The hub's transformers-4 safetensors and the original release's .pth, read from files
  (without torch), give exactly the variables of the transformers-5 state dict."""
  _, sd = _hf()
  config = _small_config()
  expected = convert.torch_to_flax(sd, config)
  hub = str(tmp_path / "model.safetensors")
  safetensors.numpy.save_file(torch_conditional_detr.hub_state_dict(sd), hub)
  original = str(tmp_path / "conditional_detr_r18.pth")
  weights = torch_conditional_detr.original_state_dict(sd)
  torch.save({"model": {k: torch.from_numpy(v) for k, v in weights.items()}, "epoch": 49}, original)
  for path, layout in ((hub, "transformers_conditional"), (original, "conditional")):
    assert convert._read(path)[0] == layout
    got = convert.torch_to_flax(convert.load_torch_checkpoint(path), config)
    jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_conditional_weights_into_a_detr_config_list_what_does_not_fit():
  _, sd = _hf()
  config = _small_config()
  config.decoder = "detr"
  with pytest.raises(ValueError) as e:
    convert.torch_to_flax(sd, config)
  msg = str(e.value)
  assert "transformers_conditional layout" in msg
  assert "transformer.decoder.layers.0.sa_qcontent_proj.weight" in msg  # unexpected
  assert "transformer.decoder.layers.0.multihead_attn.in_proj_weight" in msg  # missing


def test_r50_parameter_count_equals_transformers():
  from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, ResNetConfig

  hf = ConditionalDetrForObjectDetection(
    ConditionalDetrConfig(
      use_timm_backbone=False,
      use_pretrained_backbone=False,
      backbone_config=ResNetConfig(out_features=["stage4"]),
      num_labels=91,
    )
  )
  expected = sum(p.numel() for p in hf.parameters())  # frozen BatchNorms are buffers there
  config = base.get_model_config()
  config.decoder, config.classifier, config.num_queries = "conditional", "sigmoid", 300
  params = models.abstract_variables(models.build_model(config))["params"]
  assert models.count_params(params) == expected


def test_sine_embedding_and_inverse_sigmoid_hand_values():
  points = np.array([[0.25, 0.5]], np.float32)  # (x, y)
  emb = np.asarray(conditional.sine_embedding(points, 4))
  freq = 10000.0 ** (2 * (np.arange(4) // 2) / 4)
  ang_y, ang_x = 0.5 * 2 * np.pi / freq, 0.25 * 2 * np.pi / freq
  expect = lambda a: [np.sin(a[0]), np.cos(a[1]), np.sin(a[2]), np.cos(a[3])]
  np.testing.assert_allclose(emb[0], expect(ang_y) + expect(ang_x), atol=1e-6)
  x = np.array([0.0, 0.2, 1.0], np.float32)
  np.testing.assert_allclose(
    conditional.inverse_sigmoid(x), [np.log(1e-5), np.log(0.25), -np.log(1e-5)], rtol=1e-6
  )


def test_conditional_rejects_pre_norm_and_unknown_names():
  config = _small_config()
  config.pre_norm = True
  with pytest.raises(ValueError, match="pre_norm=False"):
    models.build_model(config)
  config = _small_config()
  config.decoder = "deformable"
  with pytest.raises(ValueError, match="config.model.decoder='deformable'"):
    models.build_model(config)
