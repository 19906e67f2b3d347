"""Evaluation: detections over a whole split, COCO metrics through pycocotools.

Each host runs the model on its own shard of the eval split; detections are gathered so
that every image is counted exactly once (batch padding is masked out), and process 0
computes the metrics.
"""

import contextlib
import functools
import io
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import input_pipeline
from detr_jax import checkpoint, conv, postprocess, sharding, visualize
from detr_jax.config_utils import apply_overrides  # noqa: F401  (re-exported)

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


def coco_metrics(coco_gt, results):
  """The 12 COCOeval bbox numbers (dict by COCO_METRIC_NAMES) and pycocotools' printed table.

  Args:
    coco_gt: COCO-format ground-truth dict; results: COCO results list.
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
    ev = COCOeval(gt, dt, "bbox")
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


def make_predict_fn(model):
  """jit: (variables, images [B, H, W, 3], orig_sizes [B, 2]) -> postprocessed detections."""

  @functools.partial(jax.jit, compiler_options=conv.compiler_options())
  def predict(variables, images, orig_sizes):
    out = model.apply(variables, images, train=False)
    return postprocess.postprocess(out["pred_logits"], out["pred_boxes"], orig_sizes)

  return predict


def _to_host(tree):
  """Global arrays -> full NumPy arrays on every host."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def evaluate(predict_fn, variables, config, info, mesh, *, num_images_to_draw=0):
  """Runs the model over the eval split and scores it.

  Returns:
    (metrics dict: COCO_METRIC_NAMES, `VOC_mAP50` for VOC, and `num_images`; COCO results
    list; list of up to
    `num_images_to_draw` uint8 images with the detections drawn at the model's resolution;
    pycocotools' printed table).
  """
  results, drawings = [], []
  num_images = 0
  image_size = tuple(config.image_size)
  for batch in input_pipeline.create_eval_iterator(
    config.data, image_size=image_size, global_batch_size=config.eval_batch_size
  ):
    gb = sharding.global_batch(
      {k: batch[k] for k in ("image", "orig_size", "image_id", "mask")}, mesh
    )
    det = predict_fn(variables, gb["image"], gb["orig_size"])
    det, ids, mask, sizes = _to_host((det, gb["image_id"], gb["mask"], gb["orig_size"]))
    num_images += int(mask.sum())
    results += postprocess.to_coco_results(det, ids, info.label_to_category_id, mask)
    if len(drawings) < num_images_to_draw:
      images = _to_host(gb["image"])
      for b in np.flatnonzero(mask)[: num_images_to_draw - len(drawings)]:
        h, w = image_size
        scale = np.array([w / sizes[b, 1], h / sizes[b, 0]] * 2, np.float32)
        drawings.append(
          visualize.draw_detections(
            visualize.denormalize(images[b]),
            det["boxes"][b] * scale,
            det["labels"][b],
            det["scores"][b],
            info.class_names,
          )
        )
  metrics, table = coco_metrics(info.coco_gt, results)
  if config.data.name == "voc":
    metrics["VOC_mAP50"] = voc_map50(info.coco_gt, results)
    table += f"\nPascal VOC mAP@0.5 = {metrics['VOC_mAP50']:.4f}"
  metrics["num_images"] = num_images
  return metrics, results, drawings, table


def write_results(workdir, step, metrics, results):
  """Writes `eval/step_{step}_{metrics,detections}.json` into the workdir (process 0 only)."""
  if jax.process_index() != 0:
    return
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  for name, obj in (("metrics", metrics), ("detections", results)):
    path = os.path.join(out_dir, f"step_{step}_{name}.json")
    with open(path + ".tmp", "w") as f:
      json.dump(obj, f)
    os.replace(path + ".tmp", path)


def evaluate_workdir(workdir, step=None, overrides=()):
  """Evaluates checkpoint `step` (default: latest) of a workdir with its saved config.

  Prints the COCO table, writes the metrics and detections JSON into `workdir/eval`, and
  returns (metrics, step).
  """
  mesh = sharding.create_mesh()
  config, model, variables, step = checkpoint.restore_model(workdir, step, overrides, mesh)
  info = input_pipeline.get_dataset_info(config.data)
  metrics, results, _, table = evaluate(make_predict_fn(model), variables, config, info, mesh)
  if jax.process_index() == 0:
    print(table)
  write_results(workdir, step, metrics, results)
  return metrics, step
