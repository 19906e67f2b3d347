"""Model outputs -> detections in original image coordinates, and COCO results format.

Softmax classifier (`model.classifier="softmax"`), as the reference DETR: softmax, drop the
no-object column, score and label = max and argmax of the rest, boxes cxcywh -> xyxy scaled
by each image's original width and height. No NMS and no threshold: every query is a
detection (COCO maxDets = 100).

Sigmoid classifier (Conditional DETR's, as its original release): every (query, class) pair
is a candidate scored sigmoid(logit); the `num_detections` best of the Q x K per image are the
detections (a query may appear with several classes), each with its query's box.

Both give `scores` [B, N], `labels` [B, N], `boxes` [B, N, 4] and `queries` [B, N] (the query
each detection comes from); N = Q (softmax) or min(num_detections, Q x K) (sigmoid).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import box_ops, resize, runtime


def postprocess(pred_logits, pred_boxes, orig_sizes):
  """Scores, labels and absolute boxes for every query.

  Args:
    pred_logits: [B, Q, K+1] (last = no object); pred_boxes: [B, Q, 4] normalized cxcywh.
    orig_sizes: [B, 2] (height, width) of the original images.

  Returns:
    dict: `scores` [B, Q] float32, `labels` [B, Q] int32 in 0..K-1, `boxes` [B, Q, 4]
    xyxy in pixels of the original image, `queries` [B, Q] int32 (0..Q-1).
  """
  prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]
  scores = prob.max(-1)
  labels = prob.argmax(-1).astype(jnp.int32)
  boxes = box_ops.cxcywh_to_xyxy(pred_boxes.astype(jnp.float32)) * _scale(orig_sizes)
  queries = jnp.broadcast_to(jnp.arange(scores.shape[1], dtype=jnp.int32), scores.shape)
  return {"scores": scores, "labels": labels, "boxes": boxes, "queries": queries}


def _scale(orig_sizes):
  """[B, 2] (height, width) -> [B, 1, 4] (w, h, w, h) float32."""
  h = orig_sizes[:, 0].astype(jnp.float32)
  w = orig_sizes[:, 1].astype(jnp.float32)
  return jnp.stack([w, h, w, h], axis=-1)[:, None, :]


def postprocess_sigmoid(pred_logits, pred_boxes, orig_sizes, num_detections):
  """The top (query, class) pairs by sigmoid score, with their queries' absolute boxes.

  Args:
    pred_logits: [B, Q, K] (no no-object column); pred_boxes: [B, Q, 4] normalized cxcywh.
    orig_sizes: [B, 2] (height, width) of the original images.
    num_detections: detections per image; N = min(num_detections, Q x K) are kept.

  Returns:
    dict: `scores` [B, N] float32 (decreasing), `labels` [B, N] int32 in 0..K-1,
    `boxes` [B, N, 4] xyxy in pixels of the original image, `queries` [B, N] int32.
  """
  b, q, k = pred_logits.shape
  prob = jax.nn.sigmoid(pred_logits.astype(jnp.float32)).reshape(b, q * k)
  scores, index = jax.lax.top_k(prob, min(num_detections, q * k))
  queries = (index // k).astype(jnp.int32)
  labels = (index % k).astype(jnp.int32)
  boxes = box_ops.cxcywh_to_xyxy(pred_boxes.astype(jnp.float32))
  boxes = jnp.take_along_axis(boxes, queries[..., None], axis=1) * _scale(orig_sizes)
  return {"scores": scores, "labels": labels, "boxes": boxes, "queries": queries}


def detections(model, outputs, orig_sizes):
  """Detections of `model`'s outputs: `postprocess` or `postprocess_sigmoid` by its
  classifier (`model`: the `models.DETR` that produced `outputs`)."""
  if model.classifier == "sigmoid":
    return postprocess_sigmoid(
      outputs["pred_logits"], outputs["pred_boxes"], orig_sizes, model.num_detections
    )
  return postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes)


def make_predict_fn(model):
  """The jitted inference of evaluation, prediction and the benchmarks: (variables, images
  [B, H, W, 3], orig_sizes [B, 2]) -> `predictions` (with a masks model's mask logits)."""

  @functools.partial(jax.jit, compiler_options=runtime.compiler_options())
  def predict(variables, images, orig_sizes):
    return predictions(model, model.apply(variables, images, train=False), orig_sizes)

  return predict


def predictions(model, outputs, orig_sizes):
  """`detections`, plus for a masks model `masks` [B, N, h, w] (each detection's mask
  logits) and `logits` [B, Q, C] (the class logits, for panoptic post-processing)."""
  det = detections(model, outputs, orig_sizes)
  if model.masks:
    queries = det["queries"][:, :, None, None]
    det["masks"] = jnp.take_along_axis(outputs["pred_masks"], queries, axis=1)
    det["logits"] = outputs["pred_logits"]
  return det


def instance_masks(mask_logits, size, orig_size):
  """Binary masks at an image's original size, as the reference's `PostProcessSegm`.

  The reference upsamples the mask logits bilinearly (align_corners False) to the size the
  model saw, thresholds sigmoid > 0.5, and resizes that to the original size with nearest
  neighbours. The same pixels are computed here directly at the original size: each output
  pixel's nearest source pixel at the model's size, interpolated from the logits.

  Args:
    mask_logits: [N, h, w] float. size: (H, W) of the model's input. orig_size: (H0, W0).

  Returns:
    bool [N, H0, W0].
  """
  x = np.asarray(mask_logits, np.float32)
  rows = resize.nearest_index(size[0], orig_size[0])
  cols = resize.nearest_index(size[1], orig_size[1])
  y0, y1, wy0, wy1 = (t[rows] for t in resize.bilinear_taps(x.shape[1], size[0]))
  x0, x1, wx0, wx1 = (t[cols] for t in resize.bilinear_taps(x.shape[2], size[1]))
  out = np.empty((x.shape[0], int(orig_size[0]), int(orig_size[1])), bool)
  for n in range(x.shape[0]):  # one mask at a time keeps the temporaries small
    across = x[n][:, x0] * wx0 + x[n][:, x1] * wx1  # [h, W0]
    out[n] = across[y0] * wy0[:, None] + across[y1] * wy1[:, None] > 0  # sigmoid > 0.5
  return out


def to_coco_segm_results(detections, image_ids, label_to_category_id, size, orig_sizes, mask):
  """Instance-mask detections as COCO results: {image_id, category_id, segmentation (RLE,
  counts as str), score}, one per detection, for pycocotools' `segm` evaluation.

  Args:
    detections: `make_predict_fn` output of a masks model (NumPy), with `masks` [B, N, h, w].
    image_ids: [B]; label_to_category_id: [K]; size: (H, W) the model saw; orig_sizes:
      [B, 2]; mask: [B] bool (False: batch padding).
  """
  from pycocotools import mask as mask_utils

  cat_ids = np.asarray(label_to_category_id)
  results = []
  for b, image_id in enumerate(np.asarray(image_ids)):
    if not mask[b]:
      continue
    binary = instance_masks(detections["masks"][b], size, orig_sizes[b])
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for q, rle in enumerate(rles):
      results.append(
        {
          "image_id": int(image_id),
          "category_id": int(cat_ids[detections["labels"][b, q]]),
          "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
          "score": float(detections["scores"][b, q]),
        }
      )
  return results


def to_coco_results(detections, image_ids, label_to_category_id, mask=None):
  """Detections as COCO results: a list of {image_id, category_id, bbox [x, y, w, h], score}.

  Args:
    detections: `detections` output (NumPy or jax arrays), [B, N, ...].
    image_ids: [B] ints; label_to_category_id: [K] ints mapping labels to dataset ids.
    mask: optional [B] bool; False rows (batch padding) are skipped.
  """
  scores = np.asarray(detections["scores"])
  labels = np.asarray(detections["labels"])
  boxes = np.asarray(detections["boxes"], dtype=np.float64)
  cat_ids = np.asarray(label_to_category_id)
  if labels.size and labels.max() >= len(cat_ids):
    raise ValueError(
      f"label {labels.max()} has no category id (label_to_category_id has {len(cat_ids)})"
    )
  results = []
  for b, image_id in enumerate(np.asarray(image_ids)):
    if mask is not None and not mask[b]:
      continue
    xywh = np.concatenate([boxes[b, :, :2], boxes[b, :, 2:] - boxes[b, :, :2]], axis=-1)
    for q in range(scores.shape[1]):
      results.append(
        {
          "image_id": int(image_id),
          "category_id": int(cat_ids[labels[b, q]]),
          "bbox": [round(float(v), 3) for v in xywh[q]],
          "score": float(scores[b, q]),
        }
      )
  return results
