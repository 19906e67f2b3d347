"""Post-processing: scores, labels, absolute boxes and COCO results."""

import jax
import numpy as np
import pytest

from detr_jax import postprocess


def test_postprocess_matches_numpy_and_maps_categories():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 4)).astype(np.float32)  # K = 3
  boxes = rng.uniform(0.2, 0.6, (2, 5, 4)).astype(np.float32)
  sizes = np.array([[100, 200], [50, 80]], np.int32)  # (h, w)
  det = jax.jit(postprocess.postprocess)(logits, boxes, sizes)
  prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(det["scores"], prob[..., :3].max(-1), rtol=1e-6)
  np.testing.assert_array_equal(det["labels"], prob[..., :3].argmax(-1))
  b = boxes[1, 2]
  expected = [
    (b[0] - b[2] / 2) * 80,
    (b[1] - b[3] / 2) * 50,
    (b[0] + b[2] / 2) * 80,
    (b[1] + b[3] / 2) * 50,
  ]
  np.testing.assert_allclose(det["boxes"][1, 2], expected, rtol=1e-5)

  cat_ids = np.array([7, 11, 42])
  results = postprocess.to_coco_results(det, [5, 9], cat_ids, mask=np.array([True, False]))
  assert len(results) == 5 and {r["image_id"] for r in results} == {5}
  r = results[3]
  assert r["category_id"] == cat_ids[int(det["labels"][0, 3])]
  x0, y0, x1, y1 = np.asarray(det["boxes"][0, 3])
  np.testing.assert_allclose(r["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=2e-3)


def test_unknown_label_is_an_error():
  det = {"scores": np.ones((1, 1)), "labels": np.array([[3]]), "boxes": np.zeros((1, 1, 4))}
  with pytest.raises(ValueError, match="label 3"):
    postprocess.to_coco_results(det, [1], np.array([1, 2]))
