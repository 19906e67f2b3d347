"""Attention maps of a detection, as in the reference DETR demo, and panels that show them.

The transformer's `Attention` modules sow head-averaged attention probabilities into the
`intermediates` collection (`model.apply(..., mutable=["intermediates"])`). Two of them
explain a detection:

  * decoder cross-attention of the last decoder layer: row q is where object query q looks
    in the feature grid ([B, Q, N], N = h * w feature cells, row-major);
  * encoder self-attention of the last encoder layer: row n is where feature cell n looks
    ([B, N, N]); the panel shows the row of the cell under each box's center.

Each row is a softmax over the N cells, so a map sums to 1 over the (h, w) grid; the grid is
(H / 32, W / 32) of the model input (H / 16 with DC5) and covers the whole image, which the
model saw resized without keeping the aspect ratio, so a map is stretched back over the
original image to be drawn.
"""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from detr_jax import visualize

# An inferno-like colormap: anchors at 0, 0.25, 0.5, 0.75, 1.
_CMAP_ANCHORS = np.array(
  [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], np.float32
)
_HEAT_ALPHA = 0.6
_TITLE_HEIGHT = 14
_GAP = 4


def _last_layer(tree, prefix):
  names = [n for n in tree if n.startswith(prefix) and n[len(prefix) :].isdigit()]
  if not names:
    raise KeyError(
      f"No {prefix}* in the intermediates (was the model applied with "
      "mutable=['intermediates'] and attention='xla'?)"
    )
  return tree[max(names, key=lambda n: int(n[len(prefix) :]))]


def last_layer_attention(intermediates):
  """The last decoder layer's cross-attention and the last encoder layer's self-attention.

  Args:
    intermediates: the `intermediates` collection of `model.apply(..., mutable=...)`.

  Returns:
    (decoder [B, Q, N], encoder [B, N, N]) float32, rows summing to 1.
  """
  t = intermediates["transformer"]
  last = _last_layer(t, "decoder_layer")
  # The DETR decoder's cross-attention is `multihead_attn`, Conditional DETR's `cross_attn`.
  dec = last["cross_attn" if "cross_attn" in last else "multihead_attn"]["attention_weights"][0]
  enc = _last_layer(t, "encoder_layer")["self_attn"]["attention_weights"][0]
  return dec.astype(jnp.float32), enc.astype(jnp.float32)


def select_maps(intermediates, scores, boxes, queries, grid, k):
  """Attention maps of the `k` highest-scoring detections of each image (jit-friendly).

  Args:
    intermediates: as for `last_layer_attention`.
    scores: [B, D] detection scores; queries: [B, D] int32, the query of each detection
      (`postprocess.detections`). boxes: [B, Q, 4] normalized cxcywh (`pred_boxes`).
    grid: (h, w) of the feature grid, h * w = N. k: number of detections (at most D are
      taken).

  Returns:
    dict: `detections` [B, k] int32 (indices into the D detections, by decreasing score);
    `queries` [B, k] int32 their queries; `decoder` [B, k, h, w] each query's
    cross-attention; `cells` [B, k, 2] int32 (row, col) of the grid cell holding each box's
    center; `encoder` [B, k, h, w] that cell's encoder self-attention.
  """
  h, w = grid
  dec, enc = last_layer_attention(intermediates)
  b, n = enc.shape[0], enc.shape[-1]
  if n != h * w:
    raise ValueError(f"attention over {n} cells does not fit the grid {grid}")
  k = min(k, scores.shape[1])
  _, top = jax.lax.top_k(scores, k)
  queries = jnp.take_along_axis(queries, top, axis=1)
  dec = jnp.take_along_axis(dec, queries[..., None], axis=1)
  centers = jnp.take_along_axis(boxes[..., :2], queries[..., None], axis=1)  # (cx, cy)
  row = jnp.clip(jnp.floor(centers[..., 1] * h), 0, h - 1).astype(jnp.int32)
  col = jnp.clip(jnp.floor(centers[..., 0] * w), 0, w - 1).astype(jnp.int32)
  enc = jnp.take_along_axis(enc, (row * w + col)[..., None], axis=1)
  return {
    "detections": top.astype(jnp.int32),
    "queries": queries.astype(jnp.int32),
    "decoder": dec.reshape(b, k, h, w),
    "cells": jnp.stack([row, col], axis=-1),
    "encoder": enc.reshape(b, k, h, w),
  }


def colorize(heat):
  """[H, W] values in [0, 1] -> uint8 [H, W, 3] (inferno-like: dark = low, yellow = high)."""
  x = np.clip(np.asarray(heat, np.float32), 0.0, 1.0) * (len(_CMAP_ANCHORS) - 1)
  lo = np.minimum(np.floor(x).astype(np.int32), len(_CMAP_ANCHORS) - 2)
  frac = (x - lo)[..., None]
  rgb = _CMAP_ANCHORS[lo] * (1 - frac) + _CMAP_ANCHORS[lo + 1] * frac
  return np.round(rgb).astype(np.uint8)


def upsample(grid_map, size):
  """Bilinear upsampling (pixel-center aligned) of a [h, w] map to `size` (H, W)."""
  image = Image.fromarray(np.asarray(grid_map, np.float32))  # mode "F"
  return np.asarray(image.resize((size[1], size[0]), Image.BILINEAR))


def overlay(image, grid_map):
  """An attention map drawn over an image.

  Args:
    image: uint8 [H, W, 3]. grid_map: [h, w] non-negative, stretched over the whole image
      and scaled so that its maximum is the top of the colormap.

  Returns:
    uint8 [H, W, 3].
  """
  heat = upsample(grid_map, image.shape[:2])
  heat = heat / max(float(heat.max()), 1e-12)
  blend = (1 - _HEAT_ALPHA) * image.astype(np.float32) + _HEAT_ALPHA * colorize(heat)
  return np.round(blend).astype(np.uint8)


def _resized(image, scale):
  h, w = image.shape[:2]
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _titled(tile, title):
  canvas = Image.new("RGB", (tile.shape[1], tile.shape[0] + _TITLE_HEIGHT), (255, 255, 255))
  canvas.paste(Image.fromarray(tile), (0, _TITLE_HEIGHT))
  ImageDraw.Draw(canvas).text((2, 1), title, fill=(0, 0, 0))
  return canvas


def draw_panel(image, boxes, labels, scores, class_names, decoder, encoder, points, tile=256):
  """A panel of attention maps for k detections of one image.

  Top row: the detections, then each detection's decoder cross-attention with its box.
  Bottom row: the chosen points, then the encoder self-attention at each point.

  Args:
    image: uint8 [H, W, 3] (original size). boxes: [k, 4] xyxy pixels of `image`.
    labels: [k] ints indexing `class_names`. scores: [k].
    decoder, encoder: [k, h, w] maps over the feature grid.
    points: [k, 2] (x, y) pixels of `image` where `encoder` was taken.
    tile: longer side of each tile in pixels.

  Returns:
    uint8 [2 * (tile_h + 14) + 4, (k + 1) * (tile_w + 4) - 4, 3], tile_h x tile_w being
    the image scaled to a longer side of `tile`.
  """
  image = np.asarray(image, np.uint8)
  scale = tile / max(image.shape[:2])
  small = _resized(image, scale)
  boxes = np.asarray(boxes, np.float32) * scale
  points = np.asarray(points, np.float32) * scale
  names = [class_names[int(c)] if int(c) < len(class_names) else str(int(c)) for c in labels]
  detections = visualize.draw_detections(small, boxes, labels, scores, class_names, 0.0)
  top = [_titled(detections, "detections")]
  bottom_base = Image.fromarray(small)
  marks = ImageDraw.Draw(bottom_base)
  for (x, y), label in zip(points, labels):
    marks.ellipse([x - 4, y - 4, x + 4, y + 4], outline=visualize.label_color(label), width=2)
  bottom = [_titled(np.asarray(bottom_base), "encoder points")]
  for i in range(len(boxes)):
    color = visualize.label_color(int(labels[i]))
    dec = Image.fromarray(overlay(small, decoder[i]))
    ImageDraw.Draw(dec).rectangle([float(v) for v in boxes[i]], outline=color, width=2)
    top.append(_titled(np.asarray(dec), f"{names[i]} {float(scores[i]):.2f}"))
    enc = Image.fromarray(overlay(small, encoder[i]))
    x, y = points[i]
    ImageDraw.Draw(enc).ellipse([x - 4, y - 4, x + 4, y + 4], outline=(255, 255, 255), width=2)
    bottom.append(_titled(np.asarray(enc), f"encoder at {names[i]}"))
  tw, th = top[0].size
  panel = Image.new("RGB", (len(top) * (tw + _GAP) - _GAP, 2 * th + _GAP), (255, 255, 255))
  for j, (t, b) in enumerate(zip(top, bottom)):
    panel.paste(t, (j * (tw + _GAP), 0))
    panel.paste(b, (j * (tw + _GAP), th + _GAP))
  return np.asarray(panel)
