"""A procedural detection dataset: coloured shapes on textured backgrounds, no download.

Image i of a split is a pure function of (seed, split, i): a muted textured background (a
colour gradient, stripes or a checkerboard, plus smooth noise) and 1..max_objects shapes
drawn on top of each other. Each class is a shape (rectangle, ellipse, triangle, cross,
diamond, ring, star, hexagon) with its own hue (jittered, with varied saturation and
brightness), so a small DETR learns it on a CPU in minutes. Object sides are drawn from
`object_size` (`data.synthetic_object_size`; 15-50% of the image side by default). Later
shapes may occlude earlier ones, but a placement is rejected if it would leave an earlier
object less than 60% visible, and every box is the tight box of the object's visible pixels
(the same convention as COCO's boxes of visible extent). Images are stored as JPEG
(quality 92) bytes in memory.

Each image also has its exact segmentation as a COCO panoptic PNG (`segments_png`): object k
is segment id k + 1, background is 0 (VOID). An object's mask is its visible part (the pixels
drawn for it that no later object covers), as COCO's instance masks are, so masks never
overlap and the box is the mask's tight box.
"""

import colorsys
import concurrent.futures
import io
import math
import os

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("rectangle", "ellipse", "triangle", "cross", "diamond", "ring", "star", "hexagon")
_SPLIT_CODES = {"train": 0, "eval": 1}
_MIN_VISIBLE = 0.6


def generate(num_images, *, split, seed, num_classes, image_size, max_objects, object_size):
  """Generates a split.

  Args:
    num_images: number of images.
    split: 'train' or 'eval' (different images for the same seed).
    seed: int.
    num_classes: 1..len(SHAPES); label k is SHAPES[k].
    image_size: (height, width).
    max_objects: objects per image are uniform in 1..max_objects (fewer when a crowded image
      has no room left).
    object_size: (min, max) side of an object as a fraction of the image's shorter side,
      0 < min <= max <= 1.

  Returns:
    A list of dicts: jpeg (bytes), boxes float32 `[n, 4]` xyxy pixels, labels int32 `[n]`,
    areas float32 `[n]` (visible pixels of each object), segments_png (bytes: the panoptic
    PNG of segment ids, object k = id k + 1, RGB = (id % 256, id // 256 % 256, id // 65536)).
  """
  if not 1 <= num_classes <= len(SHAPES):
    raise ValueError(f"synthetic_num_classes must be in 1..{len(SHAPES)}, got {num_classes}.")
  if max_objects < 1:
    raise ValueError(f"synthetic_max_objects must be >= 1, got {max_objects}.")
  lo, hi = (float(v) for v in object_size)
  if not 0 < lo <= hi <= 1:
    raise ValueError(
      f"synthetic_object_size must be (min, max), 0 < min <= max <= 1, got {object_size}."
    )
  args = dict(
    split=_SPLIT_CODES[split],
    seed=seed,
    num_classes=num_classes,
    image_size=tuple(image_size),
    max_objects=max_objects,
    side_range=(lo, hi),
  )
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda i: _generate_one(i, **args), range(num_images)))


def generate_split(data_config, split):
  """`generate` with the `synthetic_*` fields of `config.data`: the 'train' split
  (`synthetic_num_train` images) or the 'eval' split (`synthetic_num_eval`)."""
  d = data_config
  return generate(
    d.synthetic_num_train if split == "train" else d.synthetic_num_eval,
    split=split,
    seed=d.synthetic_seed,
    num_classes=d.synthetic_num_classes,
    image_size=tuple(d.synthetic_image_size),
    max_objects=d.synthetic_max_objects,
    object_size=tuple(d.synthetic_object_size),
  )


def _generate_one(index, *, split, seed, num_classes, image_size, max_objects, side_range):
  rng = np.random.default_rng([seed, split, index])
  h, w = image_size
  image = _background(rng, h, w)
  owner = np.full((h, w), -1, np.int16)
  full_areas, visible = [], []  # pixels of each placed object: drawn, still visible
  labels, colors, regions = [], [], []
  for _ in range(int(rng.integers(1, max_objects + 1))):
    label = int(rng.integers(num_classes))
    for _attempt in range(12):
      (y0, x0), mask = _shape_mask(rng, SHAPES[label], h, w, side_range)
      region = owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
      covered = np.bincount(region[mask & (region >= 0)], minlength=len(labels))
      full = int(mask.sum())
      if full == 0:
        continue
      remaining = [visible[k] - covered[k] for k in range(len(labels))]
      if all(r >= _MIN_VISIBLE * a for r, a in zip(remaining, full_areas)):
        region[mask] = len(labels)
        visible[:] = remaining
        visible.append(full)
        full_areas.append(full)
        regions.append((slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1])))
        labels.append(label)
        colors.append(_object_color(rng, label, num_classes))
        break
  # A dark outline on the visible boundary of every object keeps occlusions readable when two
  # objects of the same class overlap.
  edge = np.zeros((h, w), bool)
  edge[1:, :] |= owner[1:, :] != owner[:-1, :]
  edge[:-1, :] |= owner[:-1, :] != owner[1:, :]
  edge[:, 1:] |= owner[:, 1:] != owner[:, :-1]
  edge[:, :-1] |= owner[:, :-1] != owner[:, 1:]
  boxes = []
  for k, (color, (ys, xs)) in enumerate(zip(colors, regions)):
    m = owner[ys, xs] == k
    part = image[ys, xs]
    part[m] = color
    part[m & edge[ys, xs]] = color * 0.45
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    boxes.append(
      [xs.start + cols[0], ys.start + rows[0], xs.start + cols[-1] + 1, ys.start + rows[-1] + 1]
    )
  areas = visible
  buf = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=92)
  ids = owner.astype(np.int64) + 1
  rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
  segments = io.BytesIO()
  Image.fromarray(rgb).save(segments, format="PNG", compress_level=1)
  return dict(
    jpeg=buf.getvalue(),
    boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
    labels=np.asarray(labels, np.int32),
    areas=np.asarray(areas, np.float32),
    segments_png=segments.getvalue(),
  )


def _hsv(h, s, v):
  return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255.0


def _background(rng, h, w):
  """float32 `[h, w, 3]`: muted colours, one of three textures, plus smooth noise."""
  base_hue = rng.random()
  c0 = _hsv(base_hue, rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.8))
  c1 = _hsv(base_hue + rng.uniform(-0.2, 0.2), rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.8))
  yy = np.arange(h, dtype=np.float32)[:, None]
  xx = np.arange(w, dtype=np.float32)[None, :]
  kind = rng.integers(3)
  if kind == 0:  # linear gradient in a random direction
    a = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(a) + yy * math.sin(a)) / (h + w) + 0.5
  elif kind == 1:  # stripes
    a = rng.uniform(0, math.pi)
    period = rng.uniform(8, 40)
    t = 0.5 + 0.5 * np.sin((xx * math.cos(a) + yy * math.sin(a)) * (2 * math.pi / period))
  else:  # checkerboard
    cell = int(rng.integers(8, 40))
    t = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
  t = np.clip(t, 0, 1).astype(np.float32)[..., None]
  image = c0 + (c1 - c0) * t
  # Smooth noise: a coarse random grid upsampled to the image size.
  grid = rng.normal(0, 12.0, (6, 6, 3)).astype(np.float32)
  noise = [
    np.asarray(Image.fromarray(grid[..., c]).resize((w, h), Image.BILINEAR)) for c in range(3)
  ]
  return image + np.stack(noise, axis=-1)


def _object_color(rng, label, num_classes):
  """A saturated colour whose hue belongs to the class (+-0.03 turns)."""
  hue = label / num_classes + rng.uniform(-0.03, 0.03)
  return _hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))


def _shape_mask(rng, shape, h, w, side_range):
  """One shape with a random size (`side_range` fractions of the side) and position.

  Returns:
    ((y, x) of the mask's top-left pixel, bool mask `[mh, mw]` within the image).
  """
  side = min(h, w)
  bw = rng.uniform(*side_range) * side
  if shape in ("rectangle", "ellipse"):
    bh = bw * rng.uniform(0.6, 1.6)
  else:
    bh = bw * rng.uniform(0.85, 1.15)
  bh = float(np.clip(bh, side_range[0] * side, side_range[1] * side))
  ox = int(rng.integers(0, max(1, int(w - bw))))
  oy = int(rng.integers(0, max(1, int(h - bh))))
  mw, mh = min(int(math.ceil(bw)) + 1, w - ox), min(int(math.ceil(bh)) + 1, h - oy)
  # Shape coordinates are local to the (mh, mw) canvas.
  x0, y0, x1, y1 = 0.0, 0.0, bw - 1, bh - 1
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  canvas = Image.new("L", (mw, mh), 0)
  draw = ImageDraw.Draw(canvas)
  if shape == "rectangle":
    draw.rectangle([x0, y0, x1, y1], fill=1)
  elif shape == "ellipse":
    draw.ellipse([x0, y0, x1, y1], fill=1)
  elif shape == "triangle":
    if rng.random() < 0.5:
      draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=1)
    else:
      draw.polygon([(x0, y0), (x1, y0), (cx, y1)], fill=1)
  elif shape == "cross":
    t = rng.uniform(0.25, 0.4)
    draw.rectangle([cx - t * bw / 2, y0, cx + t * bw / 2, y1], fill=1)
    draw.rectangle([x0, cy - t * bh / 2, x1, cy + t * bh / 2], fill=1)
  elif shape == "diamond":
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=1)
  elif shape == "ring":
    t = rng.uniform(0.2, 0.3)
    draw.ellipse([x0, y0, x1, y1], fill=1)
    draw.ellipse([x0 + t * bw, y0 + t * bh, x1 - t * bw, y1 - t * bh], fill=0)
  elif shape == "star":
    draw.polygon(_star(cx, cy, bw / 2, bh / 2, rng.uniform(0, 2 * math.pi)), fill=1)
  elif shape == "hexagon":
    a0 = rng.uniform(0, math.pi / 3)
    pts = [
      (cx + bw / 2 * math.cos(a0 + k * math.pi / 3), cy + bh / 2 * math.sin(a0 + k * math.pi / 3))
      for k in range(6)
    ]
    draw.polygon(pts, fill=1)
  return (oy, ox), np.asarray(canvas, bool)


def _star(cx, cy, rx, ry, a0):
  pts = []
  for k in range(10):
    r = 1.0 if k % 2 == 0 else 0.45
    a = a0 + k * math.pi / 5
    pts.append((cx + r * rx * math.cos(a), cy + r * ry * math.sin(a)))
  return pts
