"""DETR model: parameter counts, and numerical parity with the transformers PyTorch DETR."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_detr

from configs import base
from detr_jax import backbone, convert, models


def _abstract(model_config):
  return models.abstract_variables(models.build_model(model_config))


def test_r50_parameter_counts_equal_reference():
  config = base.get_model_config()
  v = _abstract(config)
  mask = models.trainable_mask(v["params"], config.backbone_trainable, False)
  assert models.count_params(v["params"]) == 41_524_768
  assert models.count_params(v["params"], mask) == 41_302_368


def test_r101_parameter_count_equals_reference():
  config = base.get_model_config()
  config.backbone = "resnet101"
  assert models.count_params(_abstract(config)["params"]) == 60_464_672


@functools.cache
def _hf_model_and_weights():
  model = torch_detr.build_hf_detr(num_labels=91, seed=0)
  return model, torch_detr.reference_state_dict(model)


def _images(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@functools.cache
def _r50_parity_outputs():
  hf, sd = _hf_model_and_weights()
  config = base.get_model_config()
  variables = convert.torch_to_flax(sd, config)
  images = _images((2, 320, 416, 3))  # non-square: 10 x 13 feature grid
  ref_logits, ref_boxes = torch_detr.hf_outputs(hf, images)
  return config, variables, images, ref_logits, ref_boxes


def test_r50_outputs_match_transformers_detr_float32():
  config, variables, images, ref_logits, ref_boxes = _r50_parity_outputs()
  model = models.build_model(config)
  out = jax.jit(model.apply)(variables, images)
  assert out["pred_logits"].shape == (2, 100, 92)
  assert out["pred_boxes"].shape == (2, 100, 4)
  assert len(out["aux_outputs"]) == 5
  assert np.abs(ref_logits).max() > 0.1  # a meaningful comparison
  np.testing.assert_allclose(out["pred_logits"], ref_logits[-1], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["pred_boxes"], ref_boxes[-1], atol=1e-4, rtol=0)
  for i, aux in enumerate(out["aux_outputs"]):
    np.testing.assert_allclose(aux["pred_logits"], ref_logits[i], atol=1e-4, rtol=0)
    np.testing.assert_allclose(aux["pred_boxes"], ref_boxes[i], atol=1e-4, rtol=0)


def test_bfloat16_compute_within_documented_tolerance():
  """bfloat16 compute (float32 params): logits within 0.05 and boxes within 0.005 of float32."""
  config, variables, images, ref_logits, ref_boxes = _r50_parity_outputs()
  config = config.copy_and_resolve_references()
  config.dtype = "bfloat16"
  model = models.build_model(config)
  out = jax.jit(model.apply)(variables, images)
  assert out["pred_logits"].dtype == jnp.float32
  logit_err = np.abs(np.asarray(out["pred_logits"]) - ref_logits[-1]).max()
  box_err = np.abs(np.asarray(out["pred_boxes"]) - ref_boxes[-1]).max()
  assert logit_err < 0.05, logit_err
  assert box_err < 0.005, box_err


def _torch_resnet50(sd, x, dilation):
  """ResNet-50 trunk with torch convolutions from a reference-layout state dict (NCHW)."""
  p = "backbone.0.body."
  t = lambda k: torch.from_numpy(sd[p + k])

  def bn(x, name):
    scale = t(f"{name}.weight") * torch.rsqrt(t(f"{name}.running_var") + 1e-5)
    shift = t(f"{name}.bias") - t(f"{name}.running_mean") * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]

  x = F.relu(bn(F.conv2d(x, t("conv1.weight"), stride=2, padding=3), "bn1"))
  x = F.max_pool2d(x, 3, 2, 1)
  cur_dilation = 1
  for i, n in enumerate((3, 4, 6, 3)):
    stride, prev = (1 if i == 0 else 2), cur_dilation
    if i == 3 and dilation:
      cur_dilation, stride = 2, 1
    for j in range(n):
      b = f"layer{i + 1}.{j}."
      d = prev if j == 0 else cur_dilation
      s = stride if j == 0 else 1
      y = F.relu(bn(F.conv2d(x, t(b + "conv1.weight")), b + "bn1"))
      y = F.relu(bn(F.conv2d(y, t(b + "conv2.weight"), stride=s, padding=d, dilation=d), b + "bn2"))
      y = bn(F.conv2d(y, t(b + "conv3.weight")), b + "bn3")
      if j == 0:
        x = bn(F.conv2d(x, t(b + "downsample.0.weight"), stride=s), b + "downsample.1")
      x = F.relu(x + y)
  return x


@pytest.mark.parametrize("dilation", [False, True])
def test_backbone_matches_torch_convolutions(dilation):
  """Our ResNet-50 (and its DC5 variant) against torch conv2d with the same dilation/padding."""
  hf, sd = _hf_model_and_weights()
  config = base.get_model_config()
  config.dilation = dilation
  variables = convert.torch_to_flax(sd, config)
  images = _images((1, 96, 128, 3), seed=1)
  net = backbone.ResNet(
    "resnet50", dilation, ("layer2", "layer3", "layer4"), jnp.float32, False, "auto"
  )
  ours = net.apply(
    {
      "params": variables["params"]["backbone"],
      "batch_stats": variables["batch_stats"]["backbone"],
    },
    images,
  )
  with torch.no_grad():
    x = torch.from_numpy(np.transpose(images, (0, 3, 1, 2)).copy())
    ref = _torch_resnet50(sd, x, dilation).numpy().transpose(0, 2, 3, 1)
    if not dilation:  # the hand-written torch trunk is itself checked against transformers
      hf_feat = hf.model.backbone.model(x).feature_maps[-1].numpy().transpose(0, 2, 3, 1)
      np.testing.assert_allclose(ref, hf_feat, atol=1e-4, rtol=1e-4)
  stride = 16 if dilation else 32
  assert ours.shape == (1, 96 // stride, 128 // stride, 2048)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(np.asarray(ours) / scale, ref / scale, atol=1e-5)


def test_frozen_backbone_prefix_gets_no_gradient():
  config = base.get_model_config()
  config.backbone = "resnet18"
  config.hidden_dim, config.num_heads, config.dim_feedforward = 32, 2, 64
  config.num_encoder_layers = config.num_decoder_layers = 1
  config.num_queries = 4
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.key(0))
  images = _images((1, 64, 64, 3))

  def f(params):
    out = model.apply({**variables, "params": params}, images)
    return out["pred_boxes"].sum() + out["pred_logits"].sum()

  grads = jax.grad(f)(variables["params"])["backbone"]
  assert np.all(np.asarray(grads["conv1"]["kernel"]) == 0)
  assert np.all(np.asarray(grads["layer1_0"]["conv1"]["kernel"]) == 0)
  assert np.any(np.asarray(grads["layer2_0"]["conv1"]["kernel"]) != 0)


def test_pre_norm_and_remat_variants_run_and_remat_is_exact():
  config = base.get_model_config()
  config.backbone = "resnet18"
  config.hidden_dim, config.num_heads, config.dim_feedforward = 32, 2, 64
  config.num_encoder_layers = config.num_decoder_layers = 2
  config.num_queries = 4
  config.pre_norm = True
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.key(0))
  assert "encoder_norm" in variables["params"]["transformer"]
  images = _images((2, 64, 64, 3))
  config.remat = True
  remat_model = models.build_model(config)

  def loss(m, params):
    out = m.apply(
      {**variables, "params": params}, images, train=True, rngs={"dropout": jax.random.key(1)}
    )
    return (out["pred_boxes"] ** 2).sum()

  g1 = jax.grad(functools.partial(loss, model))(variables["params"])
  g2 = jax.grad(functools.partial(loss, remat_model))(variables["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)


def test_calibrate_batch_norm_uses_batch_statistics():
  config = base.get_model_config()
  config.backbone = "resnet18"
  config.hidden_dim, config.num_heads, config.dim_feedforward = 32, 2, 64
  config.num_encoder_layers = config.num_decoder_layers = 1
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.key(0))
  images = _images((4, 64, 64, 3), seed=2)
  calibrated = models.calibrate_batch_norm(model, variables, images)
  jax.tree.map(np.testing.assert_array_equal, calibrated["params"], variables["params"])
  kernel = variables["params"]["backbone"]["conv1"]["kernel"]
  conv1 = jax.lax.conv_general_dilated(
    images, kernel, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  bn1 = calibrated["batch_stats"]["backbone"]["bn1"]
  np.testing.assert_allclose(bn1["mean"], conv1.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bn1["var"], conv1.var((0, 1, 2)), rtol=1e-4)
  deep = calibrated["batch_stats"]["backbone"]["layer4_1"]["bn2"]
  assert not np.allclose(deep["var"], 1.0) and np.all(np.asarray(deep["var"]) > 0)


def _numpy_variables(model, seed=0):
  """Random variables of `model` drawn with NumPy (a jitted init compiles for a minute on a
  busy 2-core box): kernels N(0, 1/fan_in), small random biases, unit LayerNorm scales,
  identity BatchNorm statistics, query embeddings N(0, 1)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name in ("mean", "var", "scale"):
      return np.full(leaf.shape, float(name != "mean"), np.float32)
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0, fan_in**-0.5, leaf.shape).astype(np.float32)
    scale = 1.0 if name == "query_embed" else 0.1
    return (scale * rng.normal(size=leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, models.abstract_variables(model))


def _group_model_config(decoder, groups):
  config = base.get_model_config()
  config.update(backbone="resnet18", hidden_dim=32, num_heads=2, dim_feedforward=64)
  config.update(num_encoder_layers=1, num_decoder_layers=2, num_queries=4, dropout=0.0)
  config.update(decoder=decoder, groups=groups, conv="xla")
  if decoder == "conditional":
    config.classifier = "sigmoid"
  return config


@pytest.mark.parametrize("decoder", ["detr", "conditional"])
def test_query_groups_do_not_see_each_other_and_eval_runs_the_first_group(decoder):
  """Group DETR: in training, 3 groups of 4 queries; changing the query embeddings of groups
  1 and 2 changes nothing in group 0's outputs, and changing group 0's nothing in group 1's.
  Evaluation runs group 0 alone: 4 queries, the outputs group 0 has in training."""
  model = models.build_model(_group_model_config(decoder, 3))
  variables = _numpy_variables(model)
  images = _images((2, 64, 64, 3), seed=3)
  embed = np.asarray(variables["params"]["query_embed"])
  assert embed.shape == (12, 32)

  def outputs(query_embed, variables, images, train):
    params = {**variables["params"], "query_embed": query_embed}
    out = model.apply({**variables, "params": params}, images, train=train)
    return jnp.concatenate([out["pred_logits"], out["pred_boxes"]], axis=-1)

  # Variables and images as arguments: XLA would constant-fold the backbone on constants.
  jitted = jax.jit(functools.partial(outputs, train=True))
  train = lambda e: jitted(e, variables, images)
  base_out = np.asarray(train(embed))
  assert base_out.shape[:2] == (2, 12)
  others = embed.copy()
  others[4:] += np.random.default_rng(1).normal(size=(8, 32)).astype(np.float32)
  moved = np.asarray(train(others))
  np.testing.assert_array_equal(moved[:, :4], base_out[:, :4])
  assert np.abs(moved[:, 4:] - base_out[:, 4:]).max() > 1e-3
  own = embed.copy()
  own[:4] += 0.5
  assert np.abs(np.asarray(train(own))[:, 4:8] - base_out[:, 4:8]).max() == 0

  evaluated = jax.jit(functools.partial(outputs, train=False))(embed, variables, images)
  evaluated = np.asarray(evaluated)
  assert evaluated.shape[:2] == (2, 4)
  np.testing.assert_allclose(evaluated, base_out[:, :4], atol=1e-5)
