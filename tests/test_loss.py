"""The set loss against the transformers PyTorch DETR loss (a port of the reference formulas)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.loss.loss_for_object_detection import HungarianMatcher, ImageLoss

from configs import base
from detr_jax import loss as loss_lib
from detr_jax import models

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
  return loss_lib.make_loss_fn(config, num_classes=K)


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
  loss_fn = loss_lib.make_loss_fn(base.get_loss_config(), num_classes=K)

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
