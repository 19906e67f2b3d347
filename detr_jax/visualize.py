"""Drawing detections on images (predict.py pictures and TensorBoard images share this code)."""

import numpy as np
from PIL import Image, ImageDraw

from input_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD

_COLORS = [
  (230, 25, 75),
  (60, 180, 75),
  (255, 225, 25),
  (0, 130, 200),
  (245, 130, 48),
  (145, 30, 180),
  (70, 240, 240),
  (240, 50, 230),
  (210, 245, 60),
  (250, 190, 212),
]


def label_color(label):
  """The RGB color boxes of class `label` are drawn in."""
  return _COLORS[int(label) % len(_COLORS)]


def denormalize(image):
  """ImageNet-normalized float image [H, W, 3] -> uint8 [H, W, 3]."""
  x = np.asarray(image, np.float32) * IMAGENET_STD + IMAGENET_MEAN
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def draw_detections(image, boxes, labels, scores, class_names, score_threshold=0.5):
  """Draws boxes with class names and scores above `score_threshold`.

  Args:
    image: uint8 [H, W, 3]. boxes: [N, 4] xyxy in pixels of `image`. labels: [N] ints
      indexing `class_names`. scores: [N].

  Returns:
    uint8 [H, W, 3] with the drawing.
  """
  canvas = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  draw = ImageDraw.Draw(canvas)
  order = np.argsort(-np.asarray(scores))
  for i in order:
    score = float(scores[i])
    if score < score_threshold:
      continue
    label = int(labels[i])
    color = label_color(label)
    x0, y0, x1, y1 = (float(v) for v in boxes[i])
    draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
    name = class_names[label] if label < len(class_names) else str(label)
    text = f"{name} {score:.2f}"
    tw = draw.textlength(text)
    ty = max(0.0, y0 - 11)
    draw.rectangle([x0, ty, x0 + tw + 4, ty + 11], fill=color)
    draw.text((x0 + 2, ty), text, fill=(0, 0, 0))
  return np.asarray(canvas)


def draw_masks(image, masks, labels, alpha=0.5):
  """Blends each mask in its class colour over the image.

  Args:
    image: uint8 [H, W, 3]. masks: bool [N, H, W], later ones drawn over earlier ones.
    labels: [N] ints (the colours of `label_color`).

  Returns:
    uint8 [H, W, 3].
  """
  out = np.asarray(image, np.float32).copy()
  for mask, label in zip(masks, labels):
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(label_color(label), np.float32)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def draw_panoptic(image, ids, segments_info, label_of_category, alpha=0.6):
  """Colours each segment of a panoptic id map [H, W] over `image` (uint8 [H, W, 3]): stuff
  in its class colour, things one colour per instance (the class colour's palette entry
  shifted by the segment's index); VOID (ids not in `segments_info`) untouched.
  `label_of_category`: {category id: label}."""
  masks, labels = [], []
  for k, segment in enumerate(segments_info):
    masks.append(ids == segment["id"])
    labels.append(label_of_category[segment["category_id"]] + (k if segment["isthing"] else 0))
  if not masks:
    return np.asarray(image, np.uint8)
  return draw_masks(image, np.stack(masks), labels, alpha)
