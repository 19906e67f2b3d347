"""Model outputs -> detections in original image coordinates, and COCO results format.

As the reference: softmax, drop the no-object column, score and label = max and argmax of the
rest, boxes cxcywh -> xyxy scaled by each image's original width and height. No NMS and no
threshold: every query is a detection (COCO maxDets = 100).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import box_ops, runtime


def postprocess(pred_logits, pred_boxes, orig_sizes):
  """Scores, labels and absolute boxes for every query.

  Args:
    pred_logits: [B, Q, K+1] (last = no object); pred_boxes: [B, Q, 4] normalized cxcywh.
    orig_sizes: [B, 2] (height, width) of the original images.

  Returns:
    dict: `scores` [B, Q] float32, `labels` [B, Q] int32 in 0..K-1, `boxes` [B, Q, 4]
    xyxy in pixels of the original image.
  """
  prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]
  scores = prob.max(-1)
  labels = prob.argmax(-1).astype(jnp.int32)
  h = orig_sizes[:, 0].astype(jnp.float32)
  w = orig_sizes[:, 1].astype(jnp.float32)
  scale = jnp.stack([w, h, w, h], axis=-1)[:, None, :]
  boxes = box_ops.cxcywh_to_xyxy(pred_boxes.astype(jnp.float32)) * scale
  return {"scores": scores, "labels": labels, "boxes": boxes}


def make_predict_fn(model):
  """The jitted inference of evaluation, prediction and the benchmarks: (variables, images
  [B, H, W, 3], orig_sizes [B, 2]) -> `postprocess` detections."""

  @functools.partial(jax.jit, compiler_options=runtime.compiler_options())
  def predict(variables, images, orig_sizes):
    out = model.apply(variables, images, train=False)
    return postprocess(out["pred_logits"], out["pred_boxes"], orig_sizes)

  return predict


def to_coco_results(detections, image_ids, label_to_category_id, mask=None):
  """Detections as COCO results: a list of {image_id, category_id, bbox [x, y, w, h], score}.

  Args:
    detections: `postprocess` output (NumPy or jax arrays), [B, Q, ...].
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
