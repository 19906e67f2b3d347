"""COCO panoptic segmentation: the PNG id format, panoptic quality, and DETR's post-processing.

- Format (`input_pipeline.panoptic_format`, re-exported here): a panoptic PNG stores one
  segment id per pixel as RGB, id = R + 256 G + 256^2 B; id 0 is VOID (unlabeled). Each image's
  `segments_info` lists its segments: {id, category_id, iscrowd (ground truth), area, ...}.
- PQ (Kirillov et al. 2019) with exactly the rules of panopticapi's `pq_compute`: a ground
  truth and a predicted segment of the same category match when IoU > 0.5, where the union
  leaves out the predicted pixels that are VOID in the ground truth; crowd segments are never
  matched and not false negatives; an unmatched prediction is not a false positive when more
  than half of it lies on VOID plus the crowd region of its category.
- `postprocess_panoptic`: the reference DETR's `PostProcessPanoptic`, on the host in NumPy.
"""

import json
import os

import numpy as np
from PIL import Image

from detr_jax import resize

# The format helpers live in the input pipeline (the lower layer); their names stay public here.
from input_pipeline import PANOPTIC_OFFSET as OFFSET
from input_pipeline import PANOPTIC_VOID as VOID
from input_pipeline import id2rgb, load_panoptic, read_panoptic_png, rgb2id, write_panoptic_png

__all__ = [
  "OFFSET",
  "VOID",
  "id2rgb",
  "load_panoptic",
  "pq_average",
  "pq_compute",
  "pq_from_segments",
  "pq_image_stats",
  "postprocess_panoptic",
  "read_panoptic_png",
  "resize_bilinear",
  "resize_nearest",
  "rgb2id",
  "write_panoptic_png",
]


# ---------------------------------------------------------------------------------------------
# Panoptic quality
# ---------------------------------------------------------------------------------------------


def _category_table(categories):
  """COCO `categories` list or {id: info} dict -> {id: info}, in the given order."""
  if isinstance(categories, dict):
    return {int(k): v for k, v in categories.items()}
  return {int(c["id"]): c for c in categories}


def _index_of(keys, queries):
  """Position of each query in `keys` (unique ints), -1 where absent."""
  keys = np.asarray(keys, np.int64)
  queries = np.asarray(queries, np.int64)
  if keys.size == 0:
    return np.full(queries.shape, -1)
  order = np.argsort(keys)
  pos = np.clip(np.searchsorted(keys[order], queries), 0, keys.size - 1)
  return np.where(keys[order][pos] == queries, order[pos], -1)


def pq_image_stats(gt_ids, gt_segments, pred_ids, pred_segments, categories, image_id=None):
  """Per-category PQ counts of one image, by panopticapi's `pq_compute_single_core` rules.

  Args:
    gt_ids, pred_ids: [H, W] int segment ids (0 = VOID).
    gt_segments: segments_info list with id, category_id, iscrowd and area. As panopticapi,
      the ground-truth area is the JSON `area` (counted from `gt_ids` where absent).
    pred_segments: segments_info list with id and category_id; areas are counted from the PNG.
    categories: COCO categories list or {category_id: info} dict (with `isthing`).
    image_id: names the image in error messages.

  Returns:
    [C, 4] float64, one row per category in the order of `categories`: (tp, fp, fn, iou_sum).

  Raises:
    ValueError: a predicted id in the PNG missing from `pred_segments`, an id of
      `pred_segments` absent from the PNG, an unknown category id (messages name the image and
      the segment); a ground-truth segment with id 0 (VOID; panopticapi divides by zero or
      miscounts there); maps of different shapes or ids outside [0, 256^3).
  """
  cats = _category_table(categories)
  cat_ids = np.array(list(cats), np.int64)
  gt = np.asarray(gt_ids, np.int64).ravel()
  pred = np.asarray(pred_ids, np.int64).ravel()
  if np.shape(gt_ids) != np.shape(pred_ids):
    raise ValueError(f"image {image_id}: gt {np.shape(gt_ids)} and pred {np.shape(pred_ids)}")
  if gt.size and (min(gt.min(), pred.min()) < 0 or max(gt.max(), pred.max()) >= OFFSET):
    raise ValueError(f"image {image_id}: segment ids must lie in [0, 256^3)")
  gt_segs = list({s["id"]: s for s in gt_segments}.values())  # a repeated id: the last wins
  pred_segs = list({s["id"]: s for s in pred_segments}.values())
  if any(s["id"] == VOID for s in gt_segs):
    raise ValueError(f"image {image_id}: ground-truth segment id 0 is VOID")
  for kind, segs in (("predicted", pred_segs), ("ground-truth", gt_segs)):
    for s in segs:
      if s["category_id"] not in cats:
        raise ValueError(
          f"image {image_id}: {kind} segment {s['id']} has unknown category_id {s['category_id']}"
        )
  gt_seg_id = np.array([s["id"] for s in gt_segs], np.int64)
  gt_cat = _index_of(cat_ids, [s["category_id"] for s in gt_segs])
  gt_crowd = np.array([s.get("iscrowd", 0) == 1 for s in gt_segs], bool)
  pred_seg_id = np.array([s["id"] for s in pred_segs], np.int64)
  pred_cat = _index_of(cat_ids, [s["category_id"] for s in pred_segs])

  # Pixel count of every (gt id, pred id) pair present; gi, pi index the segments_info lists
  # (-1: an id not listed, e.g. VOID).
  pairs, inter = np.unique(gt * OFFSET + pred, return_counts=True)
  pair_gt, pair_pred = pairs // OFFSET, pairs % OFFSET
  gi, pi = _index_of(gt_seg_id, pair_gt), _index_of(pred_seg_id, pair_pred)
  pred_area = np.bincount(pi[pi >= 0], inter[pi >= 0], minlength=len(pred_segs))
  gt_px = np.bincount(gi[gi >= 0], inter[gi >= 0], minlength=len(gt_segs))
  gt_area = np.array([s.get("area", a) for s, a in zip(gt_segs, gt_px)], np.float64)
  on_void = (pair_gt == VOID) & (pi >= 0)
  void_px = np.bincount(pi[on_void], inter[on_void], minlength=len(pred_segs))

  # panopticapi's checks of the prediction.
  for label in np.unique(pair_pred[(pi < 0) & (pair_pred != VOID)]):
    raise ValueError(f"image {image_id}: segment {label} is in the PNG but not in segments_info")
  if (pred_area == 0).any():
    raise ValueError(
      f"image {image_id}: segments {pred_seg_id[pred_area == 0].tolist()} are in segments_info"
      " but not in the PNG"
    )

  # Matches: same category, gt not crowd, IoU > 0.5 (at most one per gt and per prediction).
  cand = (gi >= 0) & (pi >= 0)
  cand[cand] = ~gt_crowd[gi[cand]] & (gt_cat[gi[cand]] == pred_cat[pi[cand]])
  g, p, n = gi[cand], pi[cand], inter[cand]
  iou = n / (pred_area[p] + gt_area[g] - n - void_px[p])
  g, p, iou = g[iou > 0.5], p[iou > 0.5], iou[iou > 0.5]

  stats = np.zeros((len(cat_ids), 4))
  np.add.at(stats[:, 0], gt_cat[g], 1)
  np.add.at(stats[:, 3], gt_cat[g], iou)
  gt_matched = np.zeros(len(gt_segs), bool)
  gt_matched[g] = True
  np.add.at(stats[:, 2], gt_cat[~gt_matched & ~gt_crowd], 1)

  # An unmatched prediction is ignored when over half of it is VOID or its category's crowd
  # region (panopticapi keeps one crowd segment per category: the last one listed).
  crowd_of_cat = np.full(len(cat_ids), -1)
  for i in np.flatnonzero(gt_crowd):
    crowd_of_cat[gt_cat[i]] = i
  on_crowd = (gi >= 0) & (pi >= 0)
  on_crowd[on_crowd] = crowd_of_cat[pred_cat[pi[on_crowd]]] == gi[on_crowd]
  crowd_px = np.bincount(pi[on_crowd], inter[on_crowd], minlength=len(pred_segs))
  pred_matched = np.zeros(len(pred_segs), bool)
  pred_matched[p] = True
  ignored = (void_px + crowd_px) / pred_area > 0.5
  np.add.at(stats[:, 1], pred_cat[~pred_matched & ~ignored], 1)
  return stats


def pq_average(stats, categories):
  """PQ, SQ, RQ from accumulated counts, as panopticapi's `pq_average`.

  Args:
    stats: [C, 4] (tp, fp, fn, iou_sum) summed over images, rows in the order of `categories`.
    categories: COCO categories list or {category_id: info} dict (with `isthing`).

  Returns:
    {"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id:
    {"pq", "sq", "rq"}}}. A category counts (in `n` and the means) when tp + fp + fn > 0;
    per-class numbers of the others are 0. Where no category counts, the means are 0 with
    n = 0 (panopticapi divides by zero there).
  """
  cats = _category_table(categories)
  tp, fp, fn, iou = np.asarray(stats, np.float64).T
  denom = tp + 0.5 * fp + 0.5 * fn
  active = tp + fp + fn > 0
  pq = np.divide(iou, denom, out=np.zeros_like(iou), where=active)
  sq = np.divide(iou, tp, out=np.zeros_like(iou), where=tp > 0)
  rq = np.divide(tp, denom, out=np.zeros_like(iou), where=active)
  isthing = np.array([c["isthing"] == 1 for c in cats.values()], bool)
  results = {}
  for name, sel in (("All", active), ("Things", active & isthing), ("Stuff", active & ~isthing)):
    n = int(sel.sum())
    means = {k: float(v[sel].mean()) if n else 0.0 for k, v in (("pq", pq), ("sq", sq), ("rq", rq))}
    results[name] = {**means, "n": n}
  results["per_class"] = {
    c: {"pq": float(pq[i]), "sq": float(sq[i]), "rq": float(rq[i])} for i, c in enumerate(cats)
  }
  return results


def pq_table(pq):
  """`pq_average`'s result as panopticapi prints it: PQ, SQ, RQ (percent) and N for All,
  Things and Stuff."""
  lines = [f"{'':10s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}", "-" * 39]
  for part in ("All", "Things", "Stuff"):
    r = pq[part]
    lines.append(
      f"{part:10s}| {100 * r['pq']:6.1f} {100 * r['sq']:6.1f} {100 * r['rq']:6.1f} {r['n']:5d}"
    )
  return "\n".join(lines)


def pq_from_segments(images, categories):
  """PQ over images given in memory.

  Args:
    images: iterable of (image_id, gt_ids [H, W], gt_segments, pred_ids [H, W], pred_segments),
      as in `pq_image_stats`.
    categories: COCO categories list or {category_id: info} dict (with `isthing`).

  Returns:
    `pq_average`'s dict.
  """
  stats = np.zeros((len(_category_table(categories)), 4))
  for image_id, gt_ids, gt_segments, pred_ids, pred_segments in images:
    stats += pq_image_stats(gt_ids, gt_segments, pred_ids, pred_segments, categories, image_id)
  return pq_average(stats, categories)


def _load_json(obj):
  if isinstance(obj, str | os.PathLike):
    with open(obj) as f:
      return json.load(f)
  return obj


def pq_compute(gt_json, pred_json, gt_folder, pred_folder, categories=None):
  """PQ over files in the COCO panoptic format, as panopticapi's `pq_compute` (one process).

  Args:
    gt_json, pred_json: panoptic JSON dicts or paths to them (`annotations` with image_id,
      file_name and segments_info; the ground truth also has `categories`).
    gt_folder, pred_folder: folders of the PNGs named by `file_name`.
    categories: default: the ground truth's `categories`.

  Returns:
    `pq_average`'s dict. Every ground-truth image needs a prediction (ValueError otherwise).
  """
  gt_json, pred_json = (_load_json(j) for j in (gt_json, pred_json))
  categories = gt_json["categories"] if categories is None else categories
  preds = {a["image_id"]: a for a in pred_json["annotations"]}
  missing = [a["image_id"] for a in gt_json["annotations"] if a["image_id"] not in preds]
  if missing:
    raise ValueError(f"no prediction for the images with ids {missing}")

  def images():
    for gt_ann in gt_json["annotations"]:
      pred_ann = preds[gt_ann["image_id"]]
      gt_ids = read_panoptic_png(os.path.join(gt_folder, gt_ann["file_name"]))
      pred_ids = read_panoptic_png(os.path.join(pred_folder, pred_ann["file_name"]))
      yield (
        gt_ann["image_id"],
        gt_ids,
        gt_ann["segments_info"],
        pred_ids,
        pred_ann["segments_info"],
      )

  return pq_from_segments(images(), categories)


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


def resize_bilinear(x, size):
  """[N, h, w] -> [N, H, W] float32: PyTorch's bilinear `interpolate` (align_corners=False,
  no antialiasing). Source pixels and weights are exactly torch's (CPU, float32); values agree
  to a few float32 ulps (torch fuses the weighted sums' multiply-adds in its own order)."""
  x = np.asarray(x, np.float32)
  y0, y1, wy0, wy1 = resize.bilinear_taps(x.shape[1], size[0])
  x0, x1, wx0, wx1 = resize.bilinear_taps(x.shape[2], size[1])
  out = np.empty((x.shape[0], *size), np.float32)
  for n in range(x.shape[0]):  # one map at a time: 3x faster than all at once (memory traffic)
    rows = x[n][:, x0] * wx0 + x[n][:, x1] * wx1  # [h, W]
    np.multiply(rows[y0], wy0[:, None], out=out[n])
    out[n] += rows[y1] * wy1[:, None]
  return out


def resize_nearest(ids, size):
  """[h, w] int ids -> [H, W] int32 by PIL's NEAREST resize, as the reference resizes its RGB
  id image. The source pixel is about floor((i + 0.5) * h / H), but PIL's accumulated
  coordinates differ from that formula at some pixels, so PIL itself does it."""
  im = Image.fromarray(np.asarray(ids, np.int32))
  return np.asarray(im.resize((size[1], size[0]), resample=Image.Resampling.NEAREST), np.int32)


def _ids_and_areas(masks, size, target_size, merge_groups):
  """Per-pixel argmax over queries, optional stuff merge, nearest resize, areas.

  masks: [n, H * W] logits at `size`; merge_groups: lists of query indices whose pixels go
  to the group's first. Returns (ids [H0, W0] int32, area [n] int64 at `target_size`).
  """
  n = masks.shape[0]
  # The reference takes the argmax of a softmax over queries: the same as over the logits.
  ids = masks.argmax(0) if n else np.zeros(masks.shape[1], np.int64)
  for group in merge_groups:
    ids[np.isin(ids, group)] = group[0]
  ids = resize_nearest(ids.reshape(size), target_size)
  return ids, np.bincount(ids.ravel(), minlength=n)[:n]


def postprocess_panoptic(
  pred_logits, pred_masks, size, target_size, is_thing, label_to_category_id, threshold=0.85
):
  """One image's panoptic segmentation, as the reference DETR's `PostProcessPanoptic`.

  Steps, as the reference: keep queries whose argmax over all K+1 softmax classes is not
  no-object and whose score (that max) > threshold; upsample their mask logits bilinearly to
  `size`; per-pixel argmax over kept queries; pixels of later kept queries of a stuff class go
  to the first kept query of that class; resize the id map to `target_size` (nearest);
  segments of area <= 4 pixels (there) are dropped and the argmax is redone over the
  remaining queries (without the stuff merge) until none is that small. A merged-away stuff
  query has area 0, so it is always dropped and its pixels go to the next best remaining query
  (of any class). With no query kept, the id map is all 0 and `segments_info` is empty (the
  reference's one-segment branch for that case never emits a segment: it has no areas).

  Args:
    pred_logits: [Q, K+1] class logits (last = no object).
    pred_masks: [Q, h, w] mask logits.
    size: (H, W) of the image the model saw; target_size: (H0, W0) of the output.
    is_thing: [K] bool per label (False: stuff); label_to_category_id: [K] ints.
    threshold: class score a query must exceed.

  Returns:
    (ids [H0, W0] int32, segments_info): pixel value i is the segment at position i of
    segments_info, a list of {"id": i, "category_id", "isthing", "area"}. As in the
    reference, id 0 is a real segment when listed (panopticapi then scores it as one), and
    unlisted VOID otherwise.
  """
  logits = np.asarray(pred_logits, np.float32)
  prob = np.exp(logits - logits.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  labels = prob.argmax(-1)
  keep = (labels != logits.shape[-1] - 1) & (prob.max(-1) > threshold)
  labels = labels[keep]
  masks = resize_bilinear(np.asarray(pred_masks)[keep], size)
  masks = masks.reshape(len(labels), size[0] * size[1])  # [n, H * W]

  groups = {}
  for k, label in enumerate(labels):
    if not is_thing[label]:
      groups.setdefault(int(label), []).append(k)
  ids, area = _ids_and_areas(masks, size, target_size, [g for g in groups.values() if len(g) > 1])
  while (small := area <= 4).any():
    labels, masks = labels[~small], masks[~small]
    ids, area = _ids_and_areas(masks, size, target_size, [])

  segments_info = [
    {
      "id": i,
      "category_id": int(label_to_category_id[label]),
      "isthing": bool(is_thing[label]),
      "area": int(a),
    }
    for i, (label, a) in enumerate(zip(labels, area))
  ]
  return ids, segments_info
