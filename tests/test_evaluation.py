"""COCO metrics through pycocotools and the Pascal VOC mAP@0.5, on hand-made cases."""

import json
import os

import numpy as np
import pytest

from detr_jax import config_utils, metrics


def _gt(annotations, num_images=2):
  anns = [
    {
      "id": i + 1,
      "image_id": img,
      "category_id": cat,
      "bbox": bbox,
      "area": bbox[2] * bbox[3],
      "iscrowd": int(crowd),
    }
    for i, (img, cat, bbox, crowd) in enumerate(annotations)
  ]
  return {
    "images": [{"id": i, "width": 100, "height": 100} for i in range(1, num_images + 1)],
    "annotations": anns,
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
  }


def _det(img, cat, bbox, score):
  return {"image_id": img, "category_id": cat, "bbox": bbox, "score": score}


def test_coco_metrics_perfect_and_empty():
  gt = _gt([(1, 1, [10, 10, 30, 40], False), (2, 2, [50, 20, 40, 40], False)])
  perfect = [_det(1, 1, [10, 10, 30, 40], 0.9), _det(2, 2, [50, 20, 40, 40], 0.8)]
  scores, table = metrics.coco_metrics(gt, perfect)
  assert scores["AP"] == pytest.approx(1.0) and scores["AP50"] == pytest.approx(1.0)
  assert len(scores) == 12 and "Average Precision" in table
  wrong_class = [_det(1, 2, [10, 10, 30, 40], 0.9)]
  assert metrics.coco_metrics(gt, wrong_class)[0]["AP50"] == pytest.approx(0.0)
  assert metrics.coco_metrics(gt, [])[0]["AP"] == 0.0


def test_voc_map50_follows_the_voc_protocol():
  gt = _gt([(1, 1, [10, 10, 30, 30], False), (1, 1, [60, 60, 30, 30], True)])
  # TP, a detection of the difficult box (ignored), a false positive: precision stays 1 up
  # to full recall.
  dets = [
    _det(1, 1, [11, 10, 30, 30], 0.9),
    _det(1, 1, [60, 60, 30, 30], 0.8),
    _det(1, 1, [0, 70, 10, 10], 0.7),
  ]
  assert metrics.voc_map50(gt, dets) == pytest.approx(1.0)
  # A false positive ranked first halves the precision at full recall.
  dets = [_det(1, 1, [0, 70, 10, 10], 0.95), _det(1, 1, [11, 10, 30, 30], 0.9)]
  assert metrics.voc_map50(gt, dets) == pytest.approx(0.5)
  assert metrics.voc_map50(gt, dets, use_07_metric=True) == pytest.approx(0.5)
  # A duplicate of a matched box is a false positive; IoU must exceed 0.5.
  dets = [_det(1, 1, [10, 10, 30, 30], 0.9), _det(1, 1, [10, 10, 30, 30], 0.8)]
  assert metrics.voc_map50(gt, dets) == pytest.approx(1.0)
  dets = [_det(1, 1, [10, 10, 30, 30], 0.8), _det(1, 1, [25, 25, 30, 30], 0.9)]
  assert metrics.voc_map50(gt, dets) == pytest.approx(0.5)


def test_voc_map50_averages_over_categories_with_ground_truth():
  gt = _gt([(1, 1, [10, 10, 30, 30], False), (2, 2, [10, 10, 30, 30], False)])
  dets = [_det(1, 1, [10, 10, 30, 30], 0.9)]  # category 2 missed entirely
  assert metrics.voc_map50(gt, dets) == pytest.approx(0.5)
  rng = np.random.default_rng(0)
  noisy = [_det(1, 1, list(rng.uniform(0, 50, 4)), float(rng.uniform())) for _ in range(20)]
  assert 0.0 <= metrics.voc_map50(gt, noisy) <= 1.0


def test_apply_overrides_parses_literals_and_rejects_unknown_fields():
  from configs import tiny

  config = config_utils.apply_overrides(
    tiny.get_config(), ["data.data_dir=/data/x", "image_size=(64, 96)", "model.remat=True"]
  )
  assert config.data.data_dir == "/data/x" and tuple(config.image_size) == (64, 96)
  assert config.model.remat is True
  with pytest.raises(ValueError, match="no field 'model.nope'"):
    config_utils.apply_overrides(config, ["model.nope=1"])


def test_masks_model_evaluation_scores_boxes_masks_and_panoptic(tmp_path):
  """A (random) masks model over the synthetic eval split: box, segm and PQ metrics, and the
  panoptic PNGs + predictions.json that PQ recomputed from the files agrees with."""
  import jax

  import input_pipeline
  from configs import tiny
  from detr_jax import evaluation, models, panoptic, postprocess, sharding

  config = config_utils.apply_overrides(
    tiny.get_config("masks"),
    [
      "model.hidden_dim=32",
      "model.num_heads=8",
      "model.dim_feedforward=32",
      "model.conv='xla'",  # the quickest compile; eval runs XLA's convolutions anyway
      "model.num_encoder_layers=1",
      "model.num_decoder_layers=1",
      "image_size=(64,64)",
      "eval_batch_size=4",
      "data.synthetic_num_train=8",
      "data.synthetic_num_eval=6",
      "data.synthetic_image_size=(48,40)",
    ],
  )
  model = models.build_model(config.model)
  variables = models.init_variables(model, jax.random.key(0))
  # A confident class head, so that some queries pass the panoptic score threshold.
  variables["params"]["class_embed"]["bias"] = (
    variables["params"]["class_embed"]["bias"].at[0].set(20.0)
  )
  info = input_pipeline.get_dataset_info(config.data)
  out_dir = str(tmp_path / "panoptic")
  scores, results, _, table = evaluation.evaluate(
    postprocess.make_predict_fn(model),
    variables,
    config,
    info,
    sharding.create_mesh(),
    panoptic_dir=out_dir,
  )
  assert scores["num_images"] == 6 and len(results) == 6 * config.model.num_queries
  for key in ("AP", "segm_AP", "segm_AP50", "PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
    assert key in scores and 0.0 <= scores[key] <= 1.0, key
  assert "Boxes (bbox)" in table and "Instance masks (segm)" in table and "Things" in table

  # PQ again, from the written files, against the ground truth written the same way.
  pred_json = json.load(open(os.path.join(out_dir, "predictions.json")))
  assert len(pred_json["annotations"]) == 6
  gt = info.panoptic_gt
  gt_dir = tmp_path / "gt"
  gt_dir.mkdir()
  for ann in gt.json["annotations"]:
    panoptic.write_panoptic_png(str(gt_dir / f"{ann['image_id']}.png"), gt.id_map(ann["image_id"]))
  gt_json = {
    **gt.json,
    "annotations": [{**a, "file_name": f"{a['image_id']}.png"} for a in gt.json["annotations"]],
  }
  again = panoptic.pq_compute(gt_json, pred_json, str(gt_dir), out_dir, gt.categories)
  assert again["All"]["pq"] == pytest.approx(scores["PQ"], abs=1e-12)
  assert again["Things"]["sq"] == pytest.approx(scores["SQ_th"], abs=1e-12)
