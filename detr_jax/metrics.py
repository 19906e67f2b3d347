"""Detection metrics: COCO AP/AR through pycocotools, and Pascal VOC mean AP at IoU 0.5.

Both take COCO-format ground truth (a dict: `images`, `annotations`, `categories`) and a COCO
results list (`image_id`, `category_id`, `bbox` [x, y, w, h], `score`).
"""

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

COCO_METRIC_NAMES = (
  "AP",
  "AP50",
  "AP75",
  "APs",
  "APm",
  "APl",
  "AR1",
  "AR10",
  "AR100",
  "ARs",
  "ARm",
  "ARl",
)


def coco_metrics(coco_gt, results, iou_type="bbox"):
  """The 12 COCOeval numbers (dict by COCO_METRIC_NAMES) and pycocotools' printed table.

  Args:
    coco_gt: COCO-format ground-truth dict; results: COCO results list (with `bbox` for
      iou_type "bbox", `segmentation` RLEs and no `bbox` for "segm").
    iou_type: "bbox" or "segm" (instance masks; the ground truth needs `segmentation`).
  """
  gt = COCO()
  gt.dataset = coco_gt
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
  if not results:
    return {name: 0.0 for name in COCO_METRIC_NAMES}, "no detections"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  table = "\n".join(line for line in out.getvalue().splitlines() if "Average" in line)
  return {name: float(v) for name, v in zip(COCO_METRIC_NAMES, ev.stats)}, table


def _xyxy(xywh):
  b = np.asarray(xywh, np.float64).reshape(-1, 4)
  return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def _iou(box, boxes):
  """IoU of one xyxy box [4] with boxes [N, 4] -> [N] (continuous coordinates)."""
  lt = np.maximum(box[:2], boxes[:, :2])
  rb = np.minimum(box[2:], boxes[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
  area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)
  return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


def voc_map50(coco_gt, results, use_07_metric=False):
  """Pascal VOC mean AP at IoU 0.5 over the categories that have ground truth.

  The VOC protocol: per category, detections by descending score are true positives when
  they overlap an unmatched ground-truth box by IoU > 0.5; ground truth marked `iscrowd`
  (VOC "difficult") is neither required nor penalized. AP is the area under the interpolated
  precision/recall curve (VOC2010+), or the 11-point average with `use_07_metric`.
  """
  gt_by_cat = {}
  for a in coco_gt["annotations"]:
    gt_by_cat.setdefault(a["category_id"], {}).setdefault(a["image_id"], []).append(a)
  dets_by_cat = {}
  for r in results:
    dets_by_cat.setdefault(r["category_id"], []).append(r)
  aps = []
  for cat, per_image in gt_by_cat.items():
    gts = {
      i: (_xyxy([a["bbox"] for a in anns]), np.array([bool(a.get("iscrowd", 0)) for a in anns]))
      for i, anns in per_image.items()
    }
    npos = sum(int((~hard).sum()) for _, hard in gts.values())
    if npos == 0:
      continue
    used = {i: np.zeros(len(h), bool) for i, (_, h) in gts.items()}
    dets = sorted(dets_by_cat.get(cat, []), key=lambda r: -r["score"])
    tp, fp = [], []
    for d in dets:
      boxes, hard = gts.get(d["image_id"], (np.zeros((0, 4)), np.zeros(0, bool)))
      ious = _iou(_xyxy(d["bbox"])[0], boxes) if len(boxes) else np.zeros(0)
      j = int(np.argmax(ious)) if len(ious) else -1
      if j >= 0 and ious[j] > 0.5:
        if hard[j]:
          continue
        hit = not used[d["image_id"]][j]
        used[d["image_id"]][j] = True
        tp.append(hit)
        fp.append(not hit)
      else:
        tp.append(False)
        fp.append(True)
    tp, fp = np.cumsum(tp, dtype=np.float64), np.cumsum(fp, dtype=np.float64)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07_metric:
      ap = np.mean(
        [prec[rec >= t].max() if np.any(rec >= t) else 0.0 for t in np.arange(0, 1.1, 0.1)]
      )
    else:
      mrec = np.concatenate([[0.0], rec, [1.0]])
      mpre = np.concatenate([[0.0], prec, [0.0]])
      mpre = np.maximum.accumulate(mpre[::-1])[::-1]
      i = np.flatnonzero(mrec[1:] != mrec[:-1])
      ap = float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    aps.append(ap)
  return float(np.mean(aps)) if aps else 0.0
