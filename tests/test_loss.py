"""The set loss against the transformers PyTorch DETR loss (a port of the reference formulas)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.loss.loss_for_object_detection import HungarianMatcher, ImageLoss

from configs import base
from detr_jax import loss as loss_lib
from detr_jax import models, sharding

K = 5  # classes


def _random_problem(seed, batch=3, queries=12, layers=6, max_targets=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(layers, batch, queries, K + 1)).astype(np.float32) * 2
  boxes = np.concatenate(
    [
      rng.uniform(0.2, 0.8, (layers, batch, queries, 2)),
      rng.uniform(0.05, 0.4, (layers, batch, queries, 2)),
    ],
    -1,
  ).astype(np.float32)
  counts = [0, 3, 5][:batch]
  labels = np.zeros((batch, max_targets), np.int32)
  tboxes = np.zeros((batch, max_targets, 4), np.float32)
  valid = np.zeros((batch, max_targets), bool)
  for b, n in enumerate(counts):
    slots = np.sort(rng.choice(max_targets, n, replace=False))  # not only a prefix
    valid[b, slots] = True
    labels[b, slots] = rng.integers(0, K, n)
    tboxes[b, slots] = np.concatenate(
      [rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.05, 0.4, (n, 2))], -1
    )
  outputs = {
    "pred_logits": logits[-1],
    "pred_boxes": boxes[-1],
    "aux_outputs": [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(layers - 1)],
  }
  targets = {"labels": labels, "boxes": tboxes, "valid": valid}
  return outputs, targets


def _torch_losses(outputs, targets):
  """Reference formulas as implemented by transformers (scipy matching per image)."""
  t = lambda a: torch.from_numpy(np.asarray(a))
  hf_outputs = {
    "logits": t(outputs["pred_logits"]),
    "pred_boxes": t(outputs["pred_boxes"]),
    "auxiliary_outputs": [
      {"logits": t(a["pred_logits"]), "pred_boxes": t(a["pred_boxes"])}
      for a in outputs["aux_outputs"]
    ],
  }
  hf_targets = [
    {"class_labels": t(lab[v]).long(), "boxes": t(box[v])}
    for lab, box, v in zip(targets["labels"], targets["boxes"], targets["valid"])
  ]
  matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
  criterion = ImageLoss(
    matcher, num_classes=K, eos_coef=0.1, losses=["labels", "boxes", "cardinality"]
  )
  losses = {k: float(v) for k, v in criterion(hf_outputs, hf_targets).items()}
  # class_error as the reference logs it: 100 - top-1 accuracy over matched queries.
  indices = matcher({k: v for k, v in hf_outputs.items() if k != "auxiliary_outputs"}, hf_targets)
  correct = total = 0
  for b, (src, tgt) in enumerate(indices):
    pred = hf_outputs["logits"][b, src].argmax(-1)
    correct += int((pred == hf_targets[b]["class_labels"][tgt]).sum())
    total += len(src)
  losses["class_error"] = 100.0 - (100.0 * correct / total if total else 0.0)
  return losses


def _scipy_loss_fn():
  """The set loss with configs/base.py's weights (the reference's) and scipy matching."""
  config = base.get_loss_config()
  config.matcher = "scipy"
  return loss_lib.make_loss_fn(config, models.build_model(_tiny_model_config()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_set_loss_matches_transformers_loss(seed):
  outputs, targets = _random_problem(seed)
  ref = _torch_losses(outputs, targets)
  fn = jax.jit(_scipy_loss_fn())
  total, metrics = fn(outputs, targets)
  for name, value in ref.items():
    np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
  expected_total = sum(
    ref[f"loss_ce{s}"] + 5 * ref[f"loss_bbox{s}"] + 2 * ref[f"loss_giou{s}"]
    for s in ["", "_0", "_1", "_2", "_3", "_4"]
  )
  np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)


def test_no_targets_anywhere_gives_finite_loss_and_zero_box_terms():
  outputs, targets = _random_problem(0)
  targets["valid"][:] = False
  total, metrics = _scipy_loss_fn()(outputs, targets)
  assert np.isfinite(float(total))
  assert float(metrics["loss_bbox"]) == 0.0 and float(metrics["loss_giou"]) == 0.0


def _tiny_model_config():
  config = base.get_model_config()
  config.backbone = "resnet18"
  config.num_classes = K
  config.hidden_dim, config.num_heads, config.dim_feedforward = 32, 4, 64
  config.num_encoder_layers, config.num_decoder_layers = 1, 3
  config.num_queries = 8
  return config


def test_jitted_forward_loss_grad_is_finite_for_degenerate_boxes_and_empty_images():
  config = _tiny_model_config()
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.key(0), (64, 64))
  # Push the box head to zero-width/height boxes: sigmoid saturates for w and h.
  params = jax.tree.map(lambda x: x, variables["params"])
  bias = np.array(params["bbox_embed"]["layers_2"]["bias"])
  bias[2:] = -200.0
  params["bbox_embed"]["layers_2"]["bias"] = jnp.asarray(bias)
  _, targets = _random_problem(3, batch=3, queries=8, layers=3)
  images = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
  loss_fn = loss_lib.make_loss_fn(base.get_loss_config(), model)

  @jax.jit
  def step(params, rng):
    def f(p):
      out = model.apply({**variables, "params": p}, images, train=True, rngs={"dropout": rng})
      return loss_fn(out, targets)

    return jax.value_and_grad(f, has_aux=True)(params)

  (total, metrics), grads = step(params, jax.random.key(1))
  out = jax.jit(model.apply)({**variables, "params": params}, images)
  assert float(jnp.min(out["pred_boxes"][..., 2:])) == 0.0  # really degenerate
  assert not targets["valid"][0].any()  # an image with zero targets
  assert np.isfinite(float(total))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


# ---- Sigmoid focal loss (Conditional DETR) and query groups (Group DETR) --------------------


def _focal_problem(seed, **kw):
  """`_random_problem` with K logits per query (no no-object column)."""
  outputs, targets = _random_problem(seed, **kw)
  cut = lambda o: {"pred_logits": o["pred_logits"][..., :K], "pred_boxes": o["pred_boxes"]}
  outputs = {**cut(outputs), "aux_outputs": [cut(a) for a in outputs["aux_outputs"]]}
  return outputs, targets


def _torch_focal_losses(outputs, targets):
  """transformers' Conditional DETR loss (DeformableDetrForObjectDetectionLoss: sigmoid focal
  loss and focal matching cost, scipy matching per image) with the original's costs."""
  from types import SimpleNamespace

  from transformers.loss.loss_deformable_detr import (
    DeformableDetrForObjectDetectionLoss,
    DeformableDetrHungarianMatcher,
  )

  t = lambda a: torch.from_numpy(np.asarray(a))
  layers = list(outputs["aux_outputs"]) + [outputs]
  hf_targets = [
    {"class_labels": t(lab[v]).long(), "boxes": t(box[v])}
    for lab, box, v in zip(targets["labels"], targets["boxes"], targets["valid"])
  ]
  config = SimpleNamespace(
    class_cost=2,
    bbox_cost=5,
    giou_cost=2,
    num_labels=K,
    focal_alpha=0.25,
    auxiliary_loss=True,
    bbox_loss_coefficient=5,
    giou_loss_coefficient=2,
    decoder_layers=len(layers),
  )
  _, loss_dict, _ = DeformableDetrForObjectDetectionLoss(
    t(outputs["pred_logits"]),
    hf_targets,
    "cpu",
    t(outputs["pred_boxes"]),
    config,
    torch.stack([t(o["pred_logits"]) for o in layers]),
    torch.stack([t(o["pred_boxes"]) for o in layers]),
  )
  losses = {k: float(v) for k, v in loss_dict.items()}
  # class_error as the original logs it: 100 - top-1 accuracy of the matched queries' logits.
  matcher = DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
  last = {"logits": t(outputs["pred_logits"]), "pred_boxes": t(outputs["pred_boxes"])}
  correct = total = 0
  for b, (src, tgt) in enumerate(matcher(last, hf_targets)):
    correct += int((last["logits"][b, src].argmax(-1) == hf_targets[b]["class_labels"][tgt]).sum())
    total += len(src)
  losses["class_error"] = 100.0 - (100.0 * correct / total if total else 0.0)
  return losses


def _loss_fn(classifier="softmax", groups=1, **loss_fields):
  """The set loss (scipy matching) for a model with `classifier` and `groups`."""
  config = base.get_loss_config()
  config.update(matcher="scipy", **loss_fields)
  model_config = _tiny_model_config()
  model_config.update(classifier=classifier, groups=groups)
  return loss_lib.make_loss_fn(config, models.build_model(model_config))


@pytest.mark.parametrize("seed", [0, 1])
def test_sigmoid_focal_loss_matches_transformers_conditional_detr_loss(seed):
  outputs, targets = _focal_problem(seed)
  ref = _torch_focal_losses(outputs, targets)
  fn = jax.jit(_loss_fn("sigmoid", class_weight=2.0, cost_class=2.0))
  total, metrics = fn(outputs, targets)
  assert len(ref) == 4 * 6 + 1  # ce, bbox, giou, cardinality for 6 layers; class_error
  for name, value in ref.items():
    np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
  # transformers weighs loss_ce by 1 in its total; the original (and our config) by 2.
  expected_total = sum(
    2 * ref[f"loss_ce{s}"] + 5 * ref[f"loss_bbox{s}"] + 2 * ref[f"loss_giou{s}"]
    for s in ["", "_0", "_1", "_2", "_3", "_4"]
  )
  np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)


def _concat_groups(problems):
  """Outputs of several problems side by side: group g's queries are g * Q .. (g + 1) * Q - 1."""
  cat = lambda os: {
    k: np.concatenate([o[k] for o in os], axis=1) for k in ("pred_logits", "pred_boxes")
  }
  layers = [[p] + list(p["aux_outputs"]) for p in problems]
  merged = [cat([ls[i] for ls in layers]) for i in range(len(layers[0]))]
  return {**merged[0], "aux_outputs": merged[1:]}


@pytest.mark.parametrize("classifier", ["softmax", "sigmoid"])
def test_group_loss_is_the_mean_of_the_per_group_losses(classifier):
  """Three groups of different predictions for the same targets: every loss term is the mean
  of the plain loss of each group alone (each group matched on its own); the group loss runs
  shard-local over the mesh like the trainer's. K = 1 through the group path is the plain loss
  exactly."""
  problem = _focal_problem if classifier == "sigmoid" else _random_problem
  groups = [problem(seed)[0] for seed in (4, 5, 6)]
  _, targets = problem(4)
  plain = jax.jit(_loss_fn(classifier))
  per_group = [plain(g, targets)[1] for g in groups]
  config = base.get_loss_config()
  config.matcher = "scipy"
  model_config = _tiny_model_config()
  model_config.update(classifier=classifier, groups=3)
  grouped = loss_lib.make_loss_fn(
    config, models.build_model(model_config), mesh=sharding.create_mesh()
  )
  total, metrics = jax.jit(grouped)(_concat_groups(groups), targets)
  for name in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_giou_4"):
    mean = np.mean([float(m[name]) for m in per_group])
    np.testing.assert_allclose(float(metrics[name]), mean, rtol=2e-6, err_msg=name)
  np.testing.assert_allclose(float(total), np.mean([float(m["loss"]) for m in per_group]), 2e-6)
  mean_card = np.mean([float(m["cardinality_error"]) for m in per_group])
  np.testing.assert_allclose(float(metrics["cardinality_error"]), mean_card, rtol=1e-6)

  folded_outputs, folded_targets = loss_lib._fold_groups(groups[0], targets, 1)
  a = jax.jit(plain)(groups[0], targets)
  b = jax.jit(plain)(folded_outputs, folded_targets)
  jax.tree.map(np.testing.assert_array_equal, a, b)
