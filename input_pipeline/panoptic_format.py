"""The COCO panoptic format: segment-id PNGs, their json, and the panoptic ground truth.

A panoptic PNG stores one segment id per pixel as RGB, id = R + 256 G + 256^2 B; id 0 is
VOID (unlabeled). The json lists, per image, `{image_id, file_name, segments_info}` where each
segment is `{id, category_id, iscrowd, area, bbox}`, and `categories` with `isthing`.

These helpers belong to the input pipeline (the lower layer); `detr_jax.panoptic` (PQ and the
panoptic post-processing) re-exports them under their old names.
"""

import io
import json
import math
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from input_pipeline import coco_format, masks

OFFSET = 256**3  # segment ids are < 256^3; gt_id * OFFSET + pred_id encodes a (gt, pred) pair
VOID = 0


def rgb2id(rgb):
  """[..., 3] RGB (uint8 or int) -> [...] int64 ids, id = R + 256 G + 256^2 B."""
  rgb = np.asarray(rgb, np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids):
  """[...] ids in [0, 256^3) -> [..., 3] uint8 RGB, the inverse of `rgb2id`."""
  ids = np.asarray(ids, np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
    raise ValueError(f"segment ids must lie in [0, 256^3), got {ids.min()}..{ids.max()}")
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def read_panoptic_png(path):
  """A panoptic PNG (a path or the file's bytes) -> [H, W] int64 segment ids."""
  source = io.BytesIO(path) if isinstance(path, bytes) else path
  with Image.open(source) as im:
    return rgb2id(np.asarray(im.convert("RGB")))


def write_panoptic_png(path, ids):
  """Writes [H, W] segment ids as a panoptic PNG (`path`: a file name or a binary file)."""
  Image.fromarray(id2rgb(ids)).save(path, format="PNG")


def encode_panoptic_png(ids):
  """[H, W] segment ids -> the bytes of their panoptic PNG."""
  buf = io.BytesIO()
  write_panoptic_png(buf, ids)
  return buf.getvalue()


def load_panoptic(folder, annotation):
  """One COCO panoptic annotation -> (ids [H, W] int64, {segment id: segment_info})."""
  ids = read_panoptic_png(os.path.join(folder, annotation["file_name"]))
  return ids, {s["id"]: s for s in annotation["segments_info"]}


class PanopticGroundTruth:
  """The panoptic ground truth of an eval split (what PQ needs), at the original image sizes.

  Attributes:
    json: a COCO panoptic json dict: `images` ({id, width, height, file_name}), `annotations`
      ({image_id, file_name, segments_info}) and `categories` ({id, name, isthing}): only the
      images and segments the eval split keeps (see the `input_pipeline` docstring).
    folder: the folder of the PNGs named by `file_name` (panopticapi's `gt_folder`), or ""
      when the PNGs are held in memory (TFDS, synthetic): use `id_map` then.
  """

  def __init__(self, json_dict, folder, read_png):
    """`read_png`: fn(annotation) -> a path or the bytes of that image's PNG."""
    self.json = json_dict
    self.folder = folder
    self._read_png = read_png
    self._by_image = {a["image_id"]: a for a in json_dict["annotations"]}

  @property
  def categories(self):
    return self.json["categories"]

  def segments_info(self, image_id):
    """The `segments_info` list of an image."""
    return self._by_image[image_id]["segments_info"]

  def id_map(self, image_id):
    """[H, W] int64 segment ids of an image; ids its segments_info does not list are VOID."""
    ann = self._by_image[image_id]
    ids = read_panoptic_png(self._read_png(ann))
    listed = np.asarray([s["id"] for s in ann["segments_info"]], np.int64)
    return np.where(np.isin(ids, listed), ids, VOID)


def folder_ground_truth(json_dict, folder):
  """A `PanopticGroundTruth` whose PNGs are files `folder/file_name`."""
  return PanopticGroundTruth(
    json_dict, str(folder), lambda ann: os.path.join(folder, ann["file_name"])
  )


def memory_ground_truth(json_dict, pngs):
  """A `PanopticGroundTruth` whose PNGs are bytes in memory: `pngs` {image_id: bytes}."""
  return PanopticGroundTruth(json_dict, "", lambda ann: pngs[ann["image_id"]])


# ---------------------------------------------------------------------------------------------
# COCO panoptic folders: a panoptic json, an image directory and a PNG directory per split.
# ---------------------------------------------------------------------------------------------
_SOURCE = "coco_panoptic_folder"


def read_json(path):
  """A COCO panoptic json with `images`, `annotations` and `categories` lists."""
  if not path:
    raise ValueError(f"{_SOURCE}: an annotations path is empty; set data.*_annotations.")
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{_SOURCE}: annotations file {path} does not exist.") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{_SOURCE}: annotations file {path} is not valid JSON: {e}") from None
  for key in ("images", "annotations", "categories"):
    if not isinstance(data.get(key), list):
      raise ValueError(f"{_SOURCE}: {path} has no '{key}' list (COCO panoptic format).")
  return data


def _categories(data, path):
  """{id: (name, isthing)} of a panoptic json's categories."""
  cats = {}
  for c in data["categories"]:
    cid = c.get("id")
    if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0:
      raise ValueError(f"{_SOURCE}: {path}: category {c!r} has no non-negative integer id.")
    if cid in cats:
      raise ValueError(f"{_SOURCE}: {path}: category id {cid} appears twice.")
    if c.get("isthing") not in (0, 1, True, False):
      raise ValueError(f"{_SOURCE}: {path}: category {cid} has no 'isthing' 0 or 1.")
    cats[cid] = (str(c.get("name", cid)), bool(c["isthing"]))
  if not cats:
    raise ValueError(f"{_SOURCE}: {path} defines no categories.")
  return cats


def read_categories(path):
  """(id, name, isthing) of the categories of a COCO panoptic json, in id order."""
  cats = _categories(read_json(path), path)
  return [(cid, *cats[cid]) for cid in sorted(cats)]


def _index(entries, key, path, what):
  """{entry[key]: entry}; a duplicate is an error naming the json."""
  index = {}
  for entry in entries:
    k = entry.get(key)
    if k in index:
      raise ValueError(f"{_SOURCE}: {path}: {what} {k} appears twice.")
    index[k] = entry
  return index


def _png_problem(path, size):
  """Why a panoptic PNG is unusable (missing, unreadable, not an RGB PNG, size differing from
  its image's (width, height)), or None."""
  try:
    fmt, mode, w, h = coco_format._inspect_image(path)
  except FileNotFoundError:
    return f"panoptic PNG {path} is missing"
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return f"panoptic PNG {path} is unreadable ({e})"
  if fmt != "PNG" or mode not in ("RGB", "RGBA"):
    return f"panoptic {path} is a {fmt} image in mode {mode}, not an RGB PNG"
  if (w, h) != tuple(size):
    return f"panoptic PNG {path} is {w}x{h}, its image {size[0]}x{size[1]}"
  return None


def _segment_ids_in_pngs(paths):
  """{position in `paths`: set of segment ids} of the PNGs TensorFlow decodes (in parallel)."""
  if not paths:
    return {}
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), np.asarray(paths)))
  unique = lambda p: tf.unique(tf.reshape(masks.decode_segment_ids(tf.io.read_file(p)), [-1]))[0]
  ds = ds.map(lambda i, p: (i, unique(p)), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors(log_warning=False)
  return {int(i): set(ids.tolist()) for i, ids in ds.as_numpy_iterator()}


def load_panoptic_folder(annotations_path, images_dir, pngs_dir, *, label_of, verify_images, split):
  """Loads and validates one COCO panoptic split.

  Each segment of an image's `segments_info` becomes an object: box from its `bbox`, label
  `label_of[category_id]`, crowd from `iscrowd`, mask = the PNG's pixels of its id.

  Args:
    annotations_path: the panoptic json (`images`, `annotations` with image_id, file_name and
      segments_info, `categories` with isthing).
    images_dir: directory that the images' `file_name` entries are relative to.
    pngs_dir: directory of the annotations' PNGs.
    label_of: {category id: model label}; another category id is an error.
    verify_images: decode every image and PNG once: corrupt files are skipped, and each
      PNG's ids are checked against its segments_info (otherwise only the headers are read).
    split: 'train' or 'eval', for counters and messages.

  Bad input (skipped, counted in `<split>/<counter>`, logged with the file and segment id):
    image or PNG missing, unreadable, not decodable, of another size, or no annotation entry
    for the image: the image (`skipped_images`); a segment whose id is not in its PNG
    (`missing_segments`; with `verify_images`): the segment; ids in a PNG that its
    segments_info does not list (`unlisted_segments`): their pixels are VOID; a segment bbox
    that is not a valid box inside the image (`invalid_boxes`): not a target, still a segment
    of the panoptic ground truth. Malformed json (unknown image or category id, duplicate
    ids, a segment id outside [1, 256^3)): ValueError naming the json, image and segment.

  Returns:
    (`coco_format.ExampleTable` with panoptic_paths and segment_ids, the COCO instances json
    of the kept segments' boxes (things and stuff) for box AP, the `PanopticGroundTruth`,
    counters dict).
  """
  path = annotations_path
  data = read_json(path)
  cats = _categories(data, path)
  findings = coco_format._Findings(split, source=_SOURCE)
  images = _index(data["images"], "id", path, "image id")
  for iid, img in images.items():
    if "file_name" not in img:
      raise ValueError(f"{_SOURCE}: {path}: image id {iid} has no file_name.")
  annotations = _index(data["annotations"], "image_id", path, "annotation of image id")
  for iid, ann in annotations.items():
    if iid not in images:
      raise ValueError(
        f"{_SOURCE}: {path}: an annotation refers to image id {iid}, not in 'images'."
      )
    if not isinstance(ann.get("segments_info"), list) or "file_name" not in ann:
      raise ValueError(
        f"{_SOURCE}: {path}: the annotation of image id {iid} has no file_name or "
        "segments_info list."
      )
  files = coco_format._check_image_files(images, images_dir, verify_images, findings)
  pngs = {iid: os.path.join(pngs_dir, a["file_name"]) for iid, a in annotations.items()}
  bad = {}
  for iid in images:
    if iid in files.bad:
      continue
    if iid not in annotations:
      bad[iid] = "no panoptic annotation"
    elif why := _png_problem(pngs[iid], files.sizes[iid]):
      bad[iid] = why
  present = {}
  if verify_images:
    candidates = [iid for iid in annotations if iid not in files.bad and iid not in bad]
    found = _segment_ids_in_pngs([pngs[iid] for iid in candidates])
    for k, iid in enumerate(candidates):
      if k in found:
        present[iid] = found[k]
      else:
        bad[iid] = f"TensorFlow cannot decode the panoptic PNG {pngs[iid]}"
  for iid, why in bad.items():
    findings.skip("skipped_images", "skipped image", f"{images[iid]['file_name']}: {why}")

  rows, gt_images, gt_annotations, pan_annotations = [], [], [], []
  for iid, img in images.items():
    if iid in files.bad or iid in bad:
      continue
    w, h = files.sizes[iid]
    ann = annotations[iid]
    boxes, labels, crowd, segment_ids, segments = [], [], [], [], []
    listed = set()
    for seg in ann["segments_info"]:
      sid, cid = seg.get("id"), seg.get("category_id")
      where = f"{path}: image {img['file_name']}, segment {sid}"
      if not isinstance(sid, int) or isinstance(sid, bool) or not 0 < sid < OFFSET:
        raise ValueError(f"{_SOURCE}: {where}: a segment id must be an integer in [1, 256^3).")
      if sid in listed:
        raise ValueError(f"{_SOURCE}: {where}: the segment id appears twice.")
      listed.add(sid)
      if cid not in cats or cid not in label_of:
        raise ValueError(
          f"{_SOURCE}: {where}: category_id {cid} is not one of the categories {sorted(label_of)}."
        )
      what = f"segment {sid} ({ann['file_name']})"
      if iid in present and sid not in present[iid]:
        findings.skip("missing_segments", "segment id missing from its PNG", what)
        continue
      segments.append(seg)
      xyxy = coco_format._box_in_image(seg.get("bbox"), w, h, what, findings)
      if xyxy is None:
        continue
      x0, y0, x1, y1 = xyxy
      area = seg.get("area")
      if not isinstance(area, (int, float)) or not math.isfinite(area) or area <= 0:
        area = None
      boxes.append([x0 / w, y0 / h, x1 / w, y1 / h])
      labels.append(label_of[cid])
      crowd.append(bool(seg.get("iscrowd", 0)))
      segment_ids.append(sid)
      gt_annotations.append(
        coco_format.gt_annotation(
          len(gt_annotations) + 1, iid, cid, xyxy, area=area, crowd=crowd[-1]
        )
      )
    for sid in sorted(present.get(iid, set()) - listed - {VOID}):
      findings.skip(
        "unlisted_segments",
        "PNG segment ids not in segments_info (VOID)",
        f"{ann['file_name']}: id {sid}",
      )
    if not labels:
      findings.count("images_without_annotations")
    rows.append(
      dict(
        path="" if iid in files.inline else files.paths[iid],
        data=files.inline.get(iid, b""),
        height=h,
        width=w,
        image_id=iid,
        boxes=boxes,
        labels=labels,
        crowd=crowd,
        panoptic_path=pngs[iid],
        segment_ids=segment_ids,
      )
    )
    gt_images.append(coco_format.gt_image(iid, w, h, img["file_name"]))
    pan_annotations.append(dict(image_id=iid, file_name=ann["file_name"], segments_info=segments))
  findings.log(path)
  findings.counters[f"{split}/images"] = len(rows)
  coco_gt = coco_format.gt_json(gt_images, gt_annotations, [(c, cats[c][0]) for c in sorted(cats)])
  categories = [dict(id=c, name=cats[c][0], isthing=int(cats[c][1])) for c in sorted(cats)]
  panoptic_json = dict(images=gt_images, annotations=pan_annotations, categories=categories)
  ground_truth = folder_ground_truth(panoptic_json, pngs_dir)
  return coco_format.build_table(rows), coco_gt, ground_truth, dict(findings.counters)
