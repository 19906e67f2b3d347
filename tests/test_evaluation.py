"""COCO metrics through pycocotools and the Pascal VOC mAP@0.5, on hand-made cases."""

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
