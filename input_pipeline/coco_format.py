"""COCO-format annotations: loading, validation and the in-memory table the pipeline reads.

`load_coco_folder` reads an `annotations.json` (COCO "instances" format) and an image
directory and returns an `ExampleTable` (one row per usable image, boxes normalized xyxy,
contiguous labels) plus the sanitized COCO json of what it kept, for pycocotools. What it does
with bad input is listed in `input_pipeline`'s module docstring; every skip is counted in the
returned counters and logged with the file name and annotation id.

`gt_image`, `gt_annotation` and `gt_json` write the COCO json entries that every ground truth
of the pipeline (folders, TFDS eval splits, the synthetic dataset) is made of.
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

from input_pipeline import masks as mask_ops

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
    rles: object `[M]`, compressed RLE counts bytes of each object's mask (b"": none; crowd
      objects and tables without masks).
    panoptic_paths: object `[N]`, the panoptic PNG of each image ('' when `panoptic_bytes`
      holds it, or there is none).
    panoptic_bytes: object `[N]`, a panoptic PNG kept in memory (b"" otherwise).
    segment_ids: int64 `[M]`, each object's segment id in its image's panoptic PNG (0: none).
  """

  image_paths: np.ndarray
  image_bytes: np.ndarray
  sizes: np.ndarray
  image_ids: np.ndarray
  row_splits: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  crowd: np.ndarray
  rles: np.ndarray
  panoptic_paths: np.ndarray
  panoptic_bytes: np.ndarray
  segment_ids: np.ndarray

  @property
  def num_images(self):
    return len(self.image_ids)


def _objects_array(values):
  """A 1-D object array (NumPy would make a 2-D array of equal-length bytes otherwise)."""
  out = np.empty(len(values), dtype=object)
  out[:] = values
  return out


def build_table(rows):
  """An `ExampleTable` from a list of dicts with keys path, data, height, width, image_id,
  boxes (`[n, 4]` normalized xyxy), labels `[n]`, crowd `[n]`, and optionally rles `[n]`,
  panoptic_path, panoptic_data and segment_ids `[n]` (absent: none)."""
  image_bytes = _objects_array([r["data"] for r in rows])
  boxes = [np.asarray(r["boxes"], np.float32).reshape(-1, 4) for r in rows]
  rles = [v for r in rows for v in r.get("rles", [b""] * len(r["labels"]))]
  segment_ids = [v for r in rows for v in r.get("segment_ids", [0] * len(r["labels"]))]
  return ExampleTable(
    image_paths=np.asarray([r["path"] for r in rows], dtype=object),
    image_bytes=image_bytes,
    sizes=np.asarray([(r["height"], r["width"]) for r in rows], np.int32).reshape(-1, 2),
    image_ids=np.asarray([r["image_id"] for r in rows], np.int64),
    row_splits=np.cumsum([0] + [len(r["labels"]) for r in rows]).astype(np.int64),
    boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
    labels=np.asarray([v for r in rows for v in r["labels"]], np.int32),
    crowd=np.asarray([v for r in rows for v in r["crowd"]], bool),
    rles=_objects_array(rles),
    panoptic_paths=np.asarray([r.get("panoptic_path", "") for r in rows], dtype=object),
    panoptic_bytes=_objects_array([r.get("panoptic_data", b"") for r in rows]),
    segment_ids=np.asarray(segment_ids, np.int64),
  )


def read_categories(annotations_path):
  """Sorted category ids and their names from a COCO json (for the label map)."""
  data = _read_json(annotations_path)
  cats = _categories(data, annotations_path)
  ids = sorted(cats)
  return ids, [cats[i] for i in ids]


# ---------------------------------------------------------------------------------------------
# COCO json ("instances" format) entries, for pycocotools. Every ground truth the pipeline
# hands out (folders, TFDS eval splits, the synthetic dataset) is built from these.
# ---------------------------------------------------------------------------------------------
def _plain(value):
  """A NumPy scalar as the Python number JSON needs; anything else as it is (ids of a user's
  json stay what they were)."""
  return value.item() if isinstance(value, np.generic) else value


def gt_image(image_id, width, height, file_name=None):
  """A COCO `images` entry (`file_name` only when there is one)."""
  entry = dict(id=_plain(image_id), width=int(width), height=int(height))
  if file_name is not None:
    entry["file_name"] = str(file_name)
  return entry


def gt_annotation(
  ann_id, image_id, category_id, xyxy, *, area=None, crowd=False, segmentation=None
):
  """A COCO `annotations` entry of a box `xyxy` = (x0, y0, x1, y1) in pixels.

  `bbox` is [x, y, width, height]; `area` defaults to the box's area (COCO's own is the
  segmentation's area, smaller than the box's). `segmentation` (polygons or RLE, for
  pycocotools' `segm` evaluation) is written when given.
  """
  x0, y0, x1, y1 = (float(v) for v in xyxy)
  entry = dict(
    id=_plain(ann_id),
    image_id=_plain(image_id),
    category_id=int(category_id),
    bbox=[x0, y0, x1 - x0, y1 - y0],
    area=float(area) if area is not None else (x1 - x0) * (y1 - y0),
    iscrowd=int(bool(crowd)),
  )
  if segmentation is not None:
    entry["segmentation"] = segmentation
  return entry


def gt_json(images, annotations, categories):
  """A COCO instances dict from entries of `gt_image`, `gt_annotation` and (id, name) pairs."""
  return dict(
    images=list(images),
    annotations=list(annotations),
    categories=[dict(id=int(c), name=str(n)) for c, n in categories],
  )


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


def load_coco_folder(annotations_path, images_dir, *, category_ids, verify_images, masks, split):
  """Loads and validates one COCO-format split.

  Args:
    annotations_path: the COCO instances json.
    images_dir: directory that `file_name` entries are relative to.
    category_ids: sorted category ids; label i is category_ids[i]. Annotations with another
      category id are an error.
    verify_images: decode every image once (with TensorFlow, as training will) to find
      corrupt files; otherwise only the header is read.
    masks: read each annotation's `segmentation` (polygons or RLE) into the table (as
      compressed RLE) and the returned json; an unusable one skips the annotation, counted in
      `<split>/invalid_masks` (`masks.segmentation_to_rle` says what is unusable).
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
  findings = _Findings(split)
  images = _index_images(data["images"], annotations_path)
  files = _check_image_files(images, images_dir, verify_images, findings)
  objects, gt_annotations = _read_annotations(
    data["annotations"], annotations_path, images, files, known_cats, category_ids, findings, masks
  )
  rows, gt_images = [], []
  for iid, img in images.items():
    if iid in files.bad:
      continue
    objs = objects.get(iid, [])
    if not objs:
      findings.count("images_without_annotations")
    w, h = files.sizes[iid]
    rows.append(
      dict(
        path="" if iid in files.inline else files.paths[iid],
        data=files.inline.get(iid, b""),
        height=h,
        width=w,
        image_id=iid,
        boxes=[o[0] for o in objs],
        labels=[o[1] for o in objs],
        crowd=[o[2] for o in objs],
        rles=[o[3] for o in objs],
      )
    )
    gt_images.append(gt_image(iid, w, h, img["file_name"]))
  findings.log(annotations_path)
  findings.counters[f"{split}/images"] = len(rows)
  coco_gt = gt_json(gt_images, gt_annotations, [(c, known_cats[c]) for c in sorted(known_cats)])
  return build_table(rows), coco_gt, dict(findings.counters)


@dataclasses.dataclass
class _Findings:
  """What loading one split skipped or changed: counters `<split>/<name>` and, per kind of
  problem, the offending items (logged once at the end)."""

  split: str
  source: str = "coco_folder"  # names the source in the log
  counters: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  problems: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  def count(self, name):
    self.counters[f"{self.split}/{name}"] += 1

  def skip(self, name, problem, item):
    """Counts a skipped image or annotation and notes `item` (a file or annotation id)."""
    self.count(name)
    self.problems[problem].append(item)

  def log(self, annotations_path):
    for problem, items in self.problems.items():
      logging.warning(
        "%s %s (%s): %d x %s, skipped: %s%s",
        self.source,
        self.split,
        annotations_path,
        len(items),
        problem,
        "; ".join(items[:_MAX_NAMED]),
        " ..." if len(items) > _MAX_NAMED else "",
      )


def _index_images(entries, annotations_path):
  """{image id: image entry} in file order; duplicate ids or a missing file_name are errors."""
  images = {}
  for img in entries:
    iid = img.get("id")
    if iid in images:
      raise ValueError(f"coco_folder: {annotations_path}: image id {iid} appears twice.")
    if "file_name" not in img:
      raise ValueError(f"coco_folder: {annotations_path}: image id {iid} has no file_name.")
    images[iid] = img
  return images


@dataclasses.dataclass(frozen=True)
class _ImageFiles:
  """The image files of a split, by image id."""

  paths: dict  # the file of every image
  sizes: dict  # (width, height) from the header, of the usable images
  inline: dict  # PNG bytes of usable images in formats TensorFlow does not decode
  bad: dict  # why an image is skipped (missing, unreadable, wrong size, corrupt)


def _read_header(path):
  """((format, width, height), None) from the file header, or (None, why it is unreadable)."""
  try:
    fmt, _, w, h = _inspect_image(path)
    return (fmt, w, h), None
  except FileNotFoundError:
    return None, "missing file"
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return None, f"unreadable image ({e})"


def _check_image_files(images, images_dir, verify_images, findings):
  """Existence, header (format, size against the json's) and, with `verify_images`, a full
  decode of every image; converts formats TensorFlow does not decode to PNG in memory."""
  paths = {iid: os.path.join(images_dir, img["file_name"]) for iid, img in images.items()}
  with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
    headers = dict(zip(paths, pool.map(_read_header, paths.values())))

  bad = {}
  for iid, (header, err) in headers.items():
    if err is not None:
      bad[iid] = err
      continue
    _, w, h = header
    jw, jh = images[iid].get("width"), images[iid].get("height")
    if (jw is not None and jw != w) or (jh is not None and jh != h):
      bad[iid] = f"size {w}x{h} differs from the json's {jw}x{jh}"
  readable = [iid for iid in paths if iid not in bad]
  if verify_images:
    candidates = [iid for iid in readable if headers[iid][0][0] in TF_IMAGE_FORMATS]
    ok = _tf_decodable([paths[iid] for iid in candidates])
    for k, iid in enumerate(candidates):
      if k not in ok:
        bad[iid] = "TensorFlow cannot decode it (corrupt or truncated)"

  inline = {}
  for iid in readable:
    if iid in bad or headers[iid][0][0] in TF_IMAGE_FORMATS:
      continue
    try:
      inline[iid] = _to_png_bytes(paths[iid])
      findings.count("converted_images")
    except (OSError, SyntaxError, ValueError) as e:
      bad[iid] = f"unreadable image ({e})"
  for iid, why in bad.items():
    findings.skip("skipped_images", "skipped image", f"{images[iid]['file_name']}: {why}")
  sizes = {iid: headers[iid][0][1:] for iid in paths if iid not in bad}
  return _ImageFiles(paths=paths, sizes=sizes, inline=inline, bad=bad)


def _read_annotations(annotations, path, images, files, known_cats, category_ids, findings, masks):
  """Validated, clipped objects of the usable images.

  Returns:
    ({image id: [(xyxy normalized, label, crowd, RLE counts or b""), ...]}, the kept COCO
    annotation entries).

  Raises:
    ValueError: duplicate annotation ids, an unknown image id or category id.
  """
  label_of = {cid: i for i, cid in enumerate(category_ids)}
  objects = collections.defaultdict(list)
  gt_annotations = []
  seen_ids = set()
  for pos, ann in enumerate(annotations):
    aid = ann.get("id", pos + 1)
    if aid in seen_ids:
      raise ValueError(f"coco_folder: {path}: annotation id {aid} appears twice.")
    seen_ids.add(aid)
    iid = ann.get("image_id")
    if iid not in images:
      raise ValueError(
        f"coco_folder: {path}: annotation id {aid} refers to image id {iid}, "
        "which is not in 'images'."
      )
    file_name = images[iid]["file_name"]
    cid = ann.get("category_id")
    if cid not in known_cats or cid not in label_of:
      raise ValueError(
        f"coco_folder: {path}: annotation id {aid} (image {file_name}) has "
        f"category_id {cid}, which is not one of the categories {list(category_ids)}."
      )
    if iid in files.bad:
      continue
    w, h = files.sizes[iid]
    xyxy = _box_in_image(ann.get("bbox"), w, h, f"annotation {aid} ({file_name})", findings)
    if xyxy is None:
      continue
    x0, y0, x1, y1 = xyxy
    crowd = bool(ann.get("iscrowd", 0))
    area = ann.get("area")
    if not isinstance(area, (int, float)) or not math.isfinite(area) or area <= 0:
      area = None  # the clipped box's area (the mask's with masks)
    rle, segmentation = b"", None
    if masks:
      what = f"annotation {aid} ({file_name})"
      rle, dropped, why = mask_ops.segmentation_to_rle(ann.get("segmentation"), h, w)
      if rle is None:
        findings.skip("invalid_masks", "invalid mask", f"{what}: {why}")
        continue
      if dropped:
        findings.skip(
          "degenerate_polygons",
          "degenerate polygon parts (fewer than 3 points)",
          f"{what}: {dropped}",
        )
      segmentation = mask_ops.rle_json(rle, h, w)
      area = mask_ops.area(rle, h, w) if area is None else area
    objects[iid].append(
      ([x0 / w, y0 / h, x1 / w, y1 / h], label_of[cid], crowd, b"" if crowd else rle)
    )
    gt_annotations.append(
      gt_annotation(
        aid, iid, cid, (x0, y0, x1, y1), area=area, crowd=crowd, segmentation=segmentation
      )
    )
  return objects, gt_annotations


def _box_in_image(bbox, w, h, what, findings):
  """A COCO bbox clipped to a w x h image as pixel (x0, y0, x1, y1), or None when it is not a
  valid box or lies outside the image (counted in `findings` with `what` it belongs to)."""
  box = _parse_bbox(bbox)
  if box is None:
    findings.skip(
      "invalid_boxes",
      "invalid box (NaN, infinite, zero or negative size)",
      f"{what}: bbox {bbox!r}",
    )
    return None
  x, y, bw, bh = box
  x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
  if x1 <= x0 or y1 <= y0:
    findings.skip("invalid_boxes", "box outside the image", f"{what}, {w}x{h}: bbox {bbox!r}")
    return None
  if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
    findings.count("clipped_boxes")
  return x0, y0, x1, y1


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
