"""box_ops against torchvision-style formulas written in NumPy, and degenerate-box safety."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax import box_ops


def _np_giou(a, b):
  """Reference GIoU of xyxy boxes a [N, 4], b [M, 4] (proper boxes only)."""
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a[:, None] + area_b[None] - inter
  iou = inter / union
  lt_c = np.minimum(a[:, None, :2], b[None, :, :2])
  rb_c = np.maximum(a[:, None, 2:], b[None, :, 2:])
  area_c = np.prod(rb_c - lt_c, axis=-1)
  return iou, iou - (area_c - union) / area_c


def _random_boxes(rng, n):
  cxcy = rng.uniform(0.1, 0.9, (n, 2))
  wh = rng.uniform(0.05, 0.5, (n, 2))
  return np.concatenate([cxcy, wh], -1).astype(np.float32)


def test_conversions_roundtrip():
  boxes = _random_boxes(np.random.default_rng(0), 50)
  xyxy = box_ops.cxcywh_to_xyxy(boxes)
  np.testing.assert_allclose(xyxy[:, 0], boxes[:, 0] - boxes[:, 2] / 2, atol=1e-7)
  np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(xyxy), boxes, atol=1e-6)


def test_iou_and_giou_match_numpy():
  rng = np.random.default_rng(1)
  a = np.asarray(box_ops.cxcywh_to_xyxy(_random_boxes(rng, 20)))
  b = np.asarray(box_ops.cxcywh_to_xyxy(_random_boxes(rng, 30)))
  iou, giou = _np_giou(a.astype(np.float64), b.astype(np.float64))
  np.testing.assert_allclose(box_ops.box_iou(a, b), iou, atol=1e-6)
  np.testing.assert_allclose(box_ops.generalized_box_iou(a, b), giou, atol=1e-6)
  np.testing.assert_allclose(
    box_ops.elementwise_generalized_box_iou(a[:20], b[:20]), np.diag(giou[:, :20]), atol=1e-6
  )
  assert np.all(giou <= 1) and np.all(giou >= -1)
  np.testing.assert_allclose(np.diag(box_ops.generalized_box_iou(a, a)), 1.0, atol=1e-6)


@pytest.mark.parametrize(
  "box",
  [
    [0.5, 0.5, 0.0, 0.0],  # a point
    [0.5, 0.5, 0.0, 0.3],  # zero width
    [0.5, 0.5, -0.2, 0.1],  # negative width
    [0.0, 0.0, 0.0, 0.0],
  ],
)
def test_degenerate_boxes_finite_values_and_gradients(box):
  other = jnp.array([[0.4, 0.4, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0]])

  def f(b):
    xyxy = box_ops.cxcywh_to_xyxy(b[None])
    o = box_ops.cxcywh_to_xyxy(other)
    return (
      box_ops.generalized_box_iou(xyxy, o).sum()
      + box_ops.box_iou(xyxy, o).sum()
      + box_ops.elementwise_generalized_box_iou(xyxy, o[:1]).sum()
    )

  value, grad = jax.value_and_grad(f)(jnp.array(box, jnp.float32))
  assert np.isfinite(value)
  assert np.all(np.isfinite(grad))
