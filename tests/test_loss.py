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
  """Reference formulas as implemented by transformers (scipy matching per image); with
  `pred_masks` in `outputs` also its mask losses (targets[`masks`] at any resolution)."""
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
  losses = ["labels", "boxes", "cardinality"]
  if "pred_masks" in outputs:
    hf_outputs["pred_masks"] = t(outputs["pred_masks"])
    for target, masks, v in zip(hf_targets, targets["masks"], targets["valid"]):
      target["masks"] = t(masks[v]).float()
    losses.append("masks")
  matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
  criterion = ImageLoss(matcher, num_classes=K, eos_coef=0.1, losses=losses)
  losses = {k: float(v) for k, v in criterion(hf_outputs, hf_targets).items()}
  # class_error as the reference logs it: 100 - top-1 accuracy over matched queries.
  indices = matcher({k: v for k, v in hf_outputs.items() if k != "auxiliary_outputs"}, hf_targets)
  losses["indices"] = [(src.numpy(), tgt.numpy()) for src, tgt in indices]
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
  del ref["indices"]
  fn = jax.jit(_scipy_loss_fn())
  total, metrics = fn(outputs, targets)
  for name, value in ref.items():
    np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
  expected_total = sum(
    ref[f"loss_ce{s}"] + 5 * ref[f"loss_bbox{s}"] + 2 * ref[f"loss_giou{s}"]
    for s in ["", "_0", "_1", "_2", "_3", "_4"]
  )
  np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)


def _with_masks(outputs, targets, seed, mask_size, pred_size=(6, 8)):
  """Adds mask logits [B, Q, h, w] and target masks [B, T, Hm, Wm] (uint8 rectangles, a few
  empty) to a `_random_problem`."""
  rng = np.random.default_rng(seed + 100)
  batch, queries = outputs["pred_logits"].shape[:2]
  outputs["pred_masks"] = (3 * rng.normal(size=(batch, queries, *pred_size))).astype(np.float32)
  hm, wm = mask_size
  masks = np.zeros((batch, targets["labels"].shape[1], hm, wm), np.uint8)
  for b, t in zip(*np.nonzero(targets["valid"])):
    if rng.random() < 0.15:
      continue  # an empty mask (an object cropped away)
    y0, x0 = rng.integers(0, hm - 1), rng.integers(0, wm - 1)
    masks[b, t, y0 : rng.integers(y0 + 1, hm + 1), x0 : rng.integers(x0 + 1, wm + 1)] = 1
  targets["masks"] = masks
  return outputs, targets


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_losses_match_transformers_at_full_size_targets(seed):
  """Targets at 4x the prediction size (the reference's full-size masks): predictions are
  upsampled bilinearly; every term within 1e-5 relative of transformers' ImageLoss."""
  outputs, targets = _with_masks(*_random_problem(seed), seed, mask_size=(24, 32))
  ref = _torch_losses(outputs, targets)
  del ref["indices"]
  total, metrics = jax.jit(_scipy_loss_fn())(outputs, targets)
  assert ref["loss_mask"] > 0 and ref["loss_dice"] > 0
  assert "loss_mask_0" not in ref  # masks of the last decoder layer only
  for name, value in ref.items():
    np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-7, err_msg=name)
  expected_total = (
    ref["loss_mask"]
    + ref["loss_dice"]
    + sum(
      ref[f"loss_ce{s}"] + 5 * ref[f"loss_bbox{s}"] + 2 * ref[f"loss_giou{s}"]
      for s in ["", "_0", "_1", "_2", "_3", "_4"]
    )
  )
  np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)


def test_mask_losses_at_prediction_size_match_numpy_and_touch_only_matched_queries():
  """Targets at the predictions' size (data.mask_stride 4): compared directly, against the
  formulas in float64 NumPy on scipy's matching; the mask gradient reaches exactly the
  matched queries."""
  outputs, targets = _with_masks(*_random_problem(2), 2, mask_size=(6, 8))
  indices = _torch_losses(outputs, targets)["indices"]
  focal = dice = 0.0
  for b, (queries, slots) in enumerate(indices):
    for q, j in zip(queries, slots):
      x = outputs["pred_masks"][b, q].astype(np.float64).ravel()
      t = targets["masks"][b, np.flatnonzero(targets["valid"][b])[j]].astype(np.float64).ravel()
      p = 1 / (1 + np.exp(-x))
      ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
      p_t = p * t + (1 - p) * (1 - t)
      focal += np.mean((0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2)
      dice += 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
  num_boxes = targets["valid"].sum()
  fn = _scipy_loss_fn()
  _, metrics = jax.jit(fn)(outputs, targets)
  np.testing.assert_allclose(float(metrics["loss_mask"]), focal / num_boxes, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss_dice"]), dice / num_boxes, rtol=1e-5)

  def mask_terms(pred_masks):
    _, m = fn({**outputs, "pred_masks": pred_masks}, targets)
    return m["loss_mask"] + m["loss_dice"]

  grad = np.asarray(jax.jit(jax.grad(mask_terms))(outputs["pred_masks"]))
  touched = np.abs(grad).sum((2, 3)) > 0  # [B, Q]
  expected = np.zeros_like(touched)
  for b, (queries, _) in enumerate(indices):
    expected[b, queries] = True
  np.testing.assert_array_equal(touched, expected)


def test_mask_outputs_need_target_masks():
  outputs, targets = _with_masks(*_random_problem(0), 0, mask_size=(6, 8))
  del targets["masks"]
  with pytest.raises(ValueError, match="no `masks`"):
    _scipy_loss_fn()(outputs, targets)
  targets["masks"] = np.zeros((3, 6, 8), np.uint8)
  with pytest.raises(ValueError, match=r"expected \[B, T, Hm, Wm\]"):
    _scipy_loss_fn()(outputs, targets)


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
  variables = models.init_variables(model, jax.random.key(0))
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
