"""Box conversions, pairwise IoU and generalized IoU.

Boxes are `[..., 4]` arrays, either `cxcywh` (center x, center y, width, height) or `xyxy`
(x0, y0, x1, y1). All functions are pure, batch over leading dimensions, and stay finite --
values and gradients -- for degenerate boxes (zero or negative width or height), where the
reference DETR asserts.
"""

import jax.numpy as jnp

# Smallest area used as a denominator; only boxes with areas below it are affected.
_EPS = 1e-7


def cxcywh_to_xyxy(boxes):
  """[..., 4] cxcywh -> [..., 4] xyxy."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes):
  """[..., 4] xyxy -> [..., 4] cxcywh."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes):
  """[..., 4] xyxy -> [...] area; negative extents count as zero."""
  wh = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 0.0)
  return wh[..., 0] * wh[..., 1]


def _pairwise_parts(boxes1, boxes2):
  """Intersection, union, enclosing area of all pairs: [..., N, 4], [..., M, 4] -> [..., N, M]."""
  b1 = boxes1[..., :, None, :]
  b2 = boxes2[..., None, :, :]
  return _parts(b1, b2)


def _parts(b1, b2):
  """Intersection, union, enclosing area of broadcast box pairs [..., 4] xyxy -> [...]."""
  area1 = box_area(b1)
  area2 = box_area(b2)
  lt = jnp.maximum(b1[..., :2], b2[..., :2])
  rb = jnp.minimum(b1[..., 2:], b2[..., 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1 + area2 - inter
  lt_c = jnp.minimum(b1[..., :2], b2[..., :2])
  rb_c = jnp.maximum(b1[..., 2:], b2[..., 2:])
  wh_c = jnp.maximum(rb_c - lt_c, 0.0)
  enclosing = wh_c[..., 0] * wh_c[..., 1]
  return inter, union, enclosing


def _iou_giou(inter, union, enclosing):
  iou = inter / jnp.maximum(union, _EPS)
  giou = iou - (enclosing - union) / jnp.maximum(enclosing, _EPS)
  return iou, giou


def box_iou(boxes1, boxes2):
  """Pairwise IoU: [..., N, 4] xyxy, [..., M, 4] xyxy -> [..., N, M]."""
  return _iou_giou(*_pairwise_parts(boxes1, boxes2))[0]


def generalized_box_iou(boxes1, boxes2):
  """Pairwise generalized IoU: [..., N, 4], [..., M, 4] xyxy -> [..., N, M].

  In [-1, 1] for proper boxes; finite with finite gradients for degenerate ones.
  """
  return _iou_giou(*_pairwise_parts(boxes1, boxes2))[1]


def elementwise_generalized_box_iou(boxes1, boxes2):
  """GIoU of matching pairs: [..., 4] xyxy, [..., 4] xyxy -> [...]."""
  return _iou_giou(*_parts(boxes1, boxes2))[1]
