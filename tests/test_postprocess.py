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


def test_sigmoid_postprocess_keeps_the_top_query_class_pairs_with_their_query_boxes():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 3)).astype(np.float32)  # Q = 6, K = 3: 18 pairs
  boxes = rng.uniform(0.2, 0.6, (2, 6, 4)).astype(np.float32)
  sizes = np.array([[100, 200], [50, 80]], np.int32)
  det = jax.jit(lambda *a: postprocess.postprocess_sigmoid(*a, 5))(logits, boxes, sizes)
  prob = 1 / (1 + np.exp(-logits.astype(np.float64)))
  for b in range(2):
    order = np.argsort(-prob[b].ravel())[:5]
    np.testing.assert_allclose(det["scores"][b], prob[b].ravel()[order], rtol=1e-6)
    np.testing.assert_array_equal(det["queries"][b], order // 3)
    np.testing.assert_array_equal(det["labels"][b], order % 3)
    h, w = sizes[b]
    cx, cy, bw, bh = boxes[b, order // 3].T
    xyxy = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
    np.testing.assert_allclose(det["boxes"][b], xyxy.T, rtol=1e-5)
  # Fewer pairs than asked: every pair, once.
  det = postprocess.postprocess_sigmoid(logits, boxes, sizes, 100)
  assert det["scores"].shape == (2, 18)
  assert {(int(q), int(c)) for q, c in zip(det["queries"][0], det["labels"][0])} == {
    (q, c) for q in range(6) for c in range(3)
  }
  results = postprocess.to_coco_results(det, [3, 4], np.array([7, 11, 42]))
  assert len(results) == 36 and {r["category_id"] for r in results} == {7, 11, 42}


@pytest.mark.parametrize("orig_size", [(37, 53), (64, 48), (200, 150)])
def test_instance_masks_are_the_references_postprocess_segm(orig_size):
  """`instance_masks` against the reference's PostProcessSegm in torch: bilinear upsample to
  the model's size, sigmoid > 0.5, nearest resize to the original size."""
  import torch
  import torch.nn.functional as F

  size = (64, 96)
  logits = np.random.default_rng(1).normal(size=(5, 16, 24)).astype(np.float32)
  up = F.interpolate(torch.from_numpy(logits)[None], size=size, mode="bilinear")
  binary = (up.sigmoid() > 0.5).float()
  ref = F.interpolate(binary, size=orig_size, mode="nearest")[0].numpy().astype(bool)
  got = postprocess.instance_masks(logits, size, orig_size)
  assert got.shape == ref.shape == (5, *orig_size)
  np.testing.assert_array_equal(got, ref)
  assert 0.2 < got.mean() < 0.8
