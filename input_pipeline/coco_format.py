"""COCO-format annotations: loading, validation and the in-memory table the pipeline reads.

`load_coco_folder` reads an `annotations.json` (COCO "instances" format) and an image
directory and returns an `ExampleTable` (one row per usable image, boxes normalized xyxy,
contiguous labels) plus the sanitized COCO json of what it kept, for pycocotools. What it does
with bad input is listed in `input_pipeline`'s module docstring; every skip is counted in the
returned counters and logged with the file name and annotation id.
"""

import collections
import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import os

import numpy as np
import tensorflow as tf
from PIL import Image

# Formats `tf.io.decode_image` reads; others are converted with PIL to PNG in memory.
TF_IMAGE_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP"})
# At most this many offending ids are named per kind of problem in a log message.
_MAX_NAMED = 10


@dataclasses.dataclass(frozen=True)
class ExampleTable:
  """One split as random-access arrays (N images, M objects in total).

  Attributes:
    image_paths: str `[N]`, the file to read ('' when `image_bytes` holds the image).
    image_bytes: object `[N]` of bytes, an encoded image kept in memory (b'' when read from
      `image_paths`).
    sizes: int32 `[N, 2]` (height, width).
    image_ids: int64 `[N]`, the ids of the COCO json (used by pycocotools).
    row_splits: int64 `[N + 1]`, objects of image i are rows row_splits[i]:row_splits[i+1].
    boxes: float32 `[M, 4]` xyxy normalized to [0, 1] by the image size, clipped, positive.
    labels: int32 `[M]`, the model's labels.
    crowd: bool `[M]`, iscrowd (kept for the record, excluded from training targets).
  """

  image_paths: np.ndarray
  image_bytes: np.ndarray
  sizes: np.ndarray
  image_ids: np.ndarray
  row_splits: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  crowd: np.ndarray

  @property
  def num_images(self):
    return len(self.image_ids)


def build_table(rows):
  """An `ExampleTable` from a list of dicts with keys path, data, height, width, image_id,
  boxes (`[n, 4]` normalized xyxy), labels `[n]`, crowd `[n]`."""
  image_bytes = np.empty(len(rows), dtype=object)  # 1-D even when all entries are b""
  image_bytes[:] = [r["data"] for r in rows]
  boxes = [np.asarray(r["boxes"], np.float32).reshape(-1, 4) for r in rows]
  return ExampleTable(
    image_paths=np.asarray([r["path"] for r in rows], dtype=object),
    image_bytes=image_bytes,
    sizes=np.asarray([(r["height"], r["width"]) for r in rows], np.int32).reshape(-1, 2),
    image_ids=np.asarray([r["image_id"] for r in rows], np.int64),
    row_splits=np.cumsum([0] + [len(r["labels"]) for r in rows]).astype(np.int64),
    boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
    labels=np.asarray([v for r in rows for v in r["labels"]], np.int32),
    crowd=np.asarray([v for r in rows for v in r["crowd"]], bool),
  )


def read_categories(annotations_path):
  """Sorted category ids and their names from a COCO json (for the label map)."""
  data = _read_json(annotations_path)
  cats = _categories(data, annotations_path)
  ids = sorted(cats)
  return ids, [cats[i] for i in ids]


def _read_json(path):
  if not path:
    raise ValueError("coco_folder: an annotations path is empty; set data.*_annotations.")
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"coco_folder: annotations file {path} does not exist.") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"coco_folder: annotations file {path} is not valid JSON: {e}") from None
  for key in ("images", "annotations", "categories"):
    if not isinstance(data.get(key), list):
      raise ValueError(f"coco_folder: {path} has no '{key}' list (COCO instances format).")
  return data


def _categories(data, path):
  cats = {}
  for c in data["categories"]:
    cid = c.get("id")
    if not isinstance(cid, int) or isinstance(cid, bool):
      raise ValueError(f"coco_folder: {path}: category {c!r} has no integer id.")
    if cid in cats:
      raise ValueError(f"coco_folder: {path}: category id {cid} appears twice.")
    cats[cid] = str(c.get("name", cid))
  if not cats:
    raise ValueError(f"coco_folder: {path} defines no categories.")
  return cats


def _inspect_image(path):
  """(format, mode, width, height) from the file header, or raises OSError/ValueError."""
  with Image.open(path) as im:
    return im.format, im.mode, im.size[0], im.size[1]


def _to_png_bytes(path):
  """Decodes any PIL-readable image to RGB and re-encodes it as PNG."""
  with Image.open(path) as im:
    rgb = im.convert("RGB")
  buf = io.BytesIO()
  rgb.save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def _tf_decodable(paths):
  """Indices of `paths` that `tf.io.decode_image` decodes, in parallel with tf.data."""
  if not paths:
    return set()
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), np.asarray(paths)))
  ds = ds.map(
    lambda i, p: (i, tf.shape(tf.io.decode_image(tf.io.read_file(p), channels=3))[0]),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.ignore_errors(log_warning=False)
  return {int(i) for i, _ in ds.as_numpy_iterator()}


def load_coco_folder(annotations_path, images_dir, *, category_ids, verify_images, split):
  """Loads and validates one COCO-format split.

  Args:
    annotations_path: the COCO instances json.
    images_dir: directory that `file_name` entries are relative to.
    category_ids: sorted category ids; label i is category_ids[i]. Annotations with another
      category id are an error.
    verify_images: decode every image once (with TensorFlow, as training will) to find
      corrupt files; otherwise only the header is read.
    split: name used in counters and messages ('train' or 'eval').

  Returns:
    (ExampleTable, coco_gt dict of the kept images and annotations, counters dict).

  Raises:
    FileNotFoundError/ValueError: a missing or malformed json; an annotation with an
      unknown image id or category id; duplicate image or annotation ids. Messages name the
      json, the annotation id and the image file.
  """
  data = _read_json(annotations_path)
  known_cats = _categories(data, annotations_path)
  label_of = {cid: i for i, cid in enumerate(category_ids)}
  counters = collections.Counter()
  problems = collections.defaultdict(list)

  images = {}
  for img in data["images"]:
    iid = img.get("id")
    if iid in images:
      raise ValueError(f"coco_folder: {annotations_path}: image id {iid} appears twice.")
    if "file_name" not in img:
      raise ValueError(f"coco_folder: {annotations_path}: image id {iid} has no file_name.")
    images[iid] = img

  # Image files: existence, header (format, size), optional full decode.
  order = list(images)
  paths = [os.path.join(images_dir, images[i]["file_name"]) for i in order]

  def inspect(path):
    try:
      return _inspect_image(path), None
    except FileNotFoundError:
      return None, "missing file"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      return None, f"unreadable image ({e})"

  with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
    headers = list(pool.map(inspect, paths))

  bad = {}
  tf_candidates = []
  for iid, path, (header, err) in zip(order, paths, headers):
    if err is not None:
      bad[iid] = err
      continue
    fmt, _, w, h = header
    img = images[iid]
    jw, jh = img.get("width"), img.get("height")
    if (jw is not None and jw != w) or (jh is not None and jh != h):
      bad[iid] = f"size {w}x{h} differs from the json's {jw}x{jh}"
      continue
    if fmt in TF_IMAGE_FORMATS and verify_images:
      tf_candidates.append((iid, path))
  if tf_candidates:
    ok = _tf_decodable([p for _, p in tf_candidates])
    for k, (iid, _) in enumerate(tf_candidates):
      if k not in ok:
        bad[iid] = "TensorFlow cannot decode it (corrupt or truncated)"

  inline = {}
  for iid, path, (header, _) in zip(order, paths, headers):
    if iid in bad or header[0] in TF_IMAGE_FORMATS:
      continue
    try:
      inline[iid] = _to_png_bytes(path)
      counters[f"{split}/converted_images"] += 1
    except (OSError, SyntaxError, ValueError) as e:
      bad[iid] = f"unreadable image ({e})"
  for iid, why in bad.items():
    counters[f"{split}/skipped_images"] += 1
    problems["skipped image"].append(f"{images[iid]['file_name']}: {why}")
  size_of = {iid: (h[2], h[3]) for iid, (h, _) in zip(order, headers) if h is not None}

  # Annotations.
  per_image = collections.defaultdict(list)
  gt_annotations = []
  seen_ann_ids = set()
  for pos, ann in enumerate(data["annotations"]):
    aid = ann.get("id", pos + 1)
    if aid in seen_ann_ids:
      raise ValueError(f"coco_folder: {annotations_path}: annotation id {aid} appears twice.")
    seen_ann_ids.add(aid)
    iid = ann.get("image_id")
    if iid not in images:
      raise ValueError(
        f"coco_folder: {annotations_path}: annotation id {aid} refers to image id {iid}, "
        "which is not in 'images'."
      )
    file_name = images[iid]["file_name"]
    cid = ann.get("category_id")
    if cid not in known_cats or cid not in label_of:
      raise ValueError(
        f"coco_folder: {annotations_path}: annotation id {aid} (image {file_name}) has "
        f"category_id {cid}, which is not one of the categories {list(category_ids)}."
      )
    if iid in bad:
      continue
    w_img, h_img = size_of[iid]
    box = _parse_bbox(ann.get("bbox"))
    if box is None:
      counters[f"{split}/invalid_boxes"] += 1
      problems["invalid box (NaN, infinite, zero or negative size)"].append(
        f"annotation {aid} ({file_name}): bbox {ann.get('bbox')!r}"
      )
      continue
    x, y, bw, bh = box
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + bw, float(w_img)), min(y + bh, float(h_img))
    if x1 <= x0 or y1 <= y0:
      counters[f"{split}/invalid_boxes"] += 1
      problems["box outside the image"].append(
        f"annotation {aid} ({file_name}, {w_img}x{h_img}): bbox {ann.get('bbox')!r}"
      )
      continue
    if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
      counters[f"{split}/clipped_boxes"] += 1
    crowd = bool(ann.get("iscrowd", 0))
    per_image[iid].append(([x0 / w_img, y0 / h_img, x1 / w_img, y1 / h_img], label_of[cid], crowd))
    area = ann.get("area")
    if not isinstance(area, (int, float)) or not math.isfinite(area) or area <= 0:
      area = (x1 - x0) * (y1 - y0)
    gt_annotations.append(
      dict(
        id=aid,
        image_id=iid,
        category_id=cid,
        bbox=[x0, y0, x1 - x0, y1 - y0],
        area=float(area),
        iscrowd=int(crowd),
      )
    )

  path_of = dict(zip(order, paths))
  rows = []
  gt_images = []
  for iid in order:
    if iid in bad:
      continue
    objs = per_image.get(iid, [])
    if not objs:
      counters[f"{split}/images_without_annotations"] += 1
    w_img, h_img = size_of[iid]
    rows.append(
      dict(
        path="" if iid in inline else path_of[iid],
        data=inline.get(iid, b""),
        height=h_img,
        width=w_img,
        image_id=iid,
        boxes=[o[0] for o in objs],
        labels=[o[1] for o in objs],
        crowd=[o[2] for o in objs],
      )
    )
    gt_images.append(dict(id=iid, file_name=images[iid]["file_name"], width=w_img, height=h_img))

  for what, items in problems.items():
    logging.warning(
      "coco_folder %s (%s): %d x %s, skipped: %s%s",
      split,
      annotations_path,
      len(items),
      what,
      "; ".join(items[:_MAX_NAMED]),
      " ..." if len(items) > _MAX_NAMED else "",
    )
  counters[f"{split}/images"] = len(rows)
  coco_gt = dict(
    images=gt_images,
    annotations=gt_annotations,
    categories=[dict(id=c, name=known_cats[c]) for c in sorted(known_cats)],
  )
  return build_table(rows), coco_gt, dict(counters)


def _parse_bbox(bbox):
  """(x, y, w, h) floats of a valid COCO bbox, or None (wrong shape, NaN/inf, w or h <= 0)."""
  if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
    return None
  try:
    x, y, w, h = (float(v) for v in bbox)
  except (TypeError, ValueError):
    return None
  if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
    return None
  return x, y, w, h
