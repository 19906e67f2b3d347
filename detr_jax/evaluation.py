"""Evaluation: the model over a whole eval split, scored by `detr_jax/metrics.py`.

Each host runs the model on its own shard of the eval split; detections are gathered so
that every image is counted exactly once (batch padding is masked out), and every process
computes the metrics (process 0 writes them).
"""

import itertools
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import input_pipeline
from detr_jax import (
  checkpoint,
  files,
  metrics,
  panoptic,
  postprocess,
  progress,
  runtime,
  sharding,
  visualize,
)


def _to_host(tree):
  """Global arrays -> full NumPy arrays on every host."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


# Numbers the evaluations of this process: every process runs the same ones, in order, so the
# start barrier of each has the same name everywhere.
_EVAL_RUNS = itertools.count()

# An evaluation longer than this logs its progress (images done / total, rate) this often.
PROGRESS_EVERY_SECONDS = 30


class _MaskScores:
  """The mask side of evaluating a masks model (`config.model.masks`): instance masks scored
  with pycocotools `segm` (where the ground truth has segmentations) and panoptic quality
  (where the split has panoptic ground truth, softmax classifier)."""

  def __init__(self, config, info, panoptic_dir):
    self.size = tuple(config.image_size)
    self.info = info
    anns = info.coco_gt["annotations"]
    self.segm = [] if anns and "segmentation" in anns[0] else None
    self.panoptic = info.panoptic_gt if config.model.classifier == "softmax" else None
    self.panoptic_dir = panoptic_dir
    self.pq_stats, self.pred_annotations = 0.0, []
    if self.panoptic is not None and panoptic_dir:
      os.makedirs(panoptic_dir, exist_ok=True)

  def add(self, det, ids, mask, sizes):
    """One gathered batch: `make_predict_fn` outputs and the batch's ids, mask, orig sizes."""
    labels = self.info.label_to_category_id
    if self.segm is not None:
      self.segm += postprocess.to_coco_segm_results(det, ids, labels, self.size, sizes, mask)
    if self.panoptic is None:
      return
    for b in np.flatnonzero(mask):
      image_id = int(ids[b])
      pred_ids, segments = panoptic.postprocess_panoptic(
        det["logits"][b], det["masks"][b], self.size, tuple(sizes[b]), self.info.is_thing, labels
      )
      gt_ids = self.panoptic.id_map(image_id)
      self.pq_stats = self.pq_stats + panoptic.pq_image_stats(
        gt_ids,
        self.panoptic.segments_info(image_id),
        pred_ids,
        segments,
        self.panoptic.categories,
        image_id,
      )
      if self.panoptic_dir and jax.process_index() == 0:
        name = f"{image_id}.png"
        panoptic.write_panoptic_png(os.path.join(self.panoptic_dir, name), pred_ids)
        self.pred_annotations.append(
          {"image_id": image_id, "file_name": name, "segments_info": segments}
        )

  def finish(self):
    """(metrics `segm_*` and `PQ*`, their tables) of everything added."""
    scores, tables = {}, []
    if self.segm is not None:
      segm, table = metrics.coco_metrics(self.info.coco_gt, self.segm, "segm")
      scores.update({f"segm_{k}": v for k, v in segm.items()})
      tables.append("Instance masks (segm):\n" + table)
    if self.panoptic is not None:
      pq = panoptic.pq_average(np.asarray(self.pq_stats), self.panoptic.categories)
      for part, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for k in ("pq", "sq", "rq"):
          scores[f"{k.upper()}{suffix}"] = pq[part][k]
      tables.append(panoptic.pq_table(pq))
      if self.panoptic_dir and jax.process_index() == 0:
        files.write_json(
          os.path.join(self.panoptic_dir, "predictions.json"),
          {"annotations": self.pred_annotations, "categories": self.panoptic.categories},
        )
    return scores, tables


def eval_batches(config):
  """This host's eval batches for `config` (`input_pipeline.create_eval_iterator`): one full
  pass each time it is iterated, so a training run builds its tf.data pipeline once."""
  return input_pipeline.create_eval_iterator(
    config.data, image_size=tuple(config.image_size), global_batch_size=config.eval_batch_size
  )


def evaluate(
  predict_fn,
  variables,
  config,
  info,
  mesh,
  *,
  num_images_to_draw=0,
  panoptic_dir="",
  batches=None,
):
  """Runs the model over the eval split and scores it.

  A multi-process run compiles `predict_fn` and lines the processes up at a barrier before
  the first gather of detections (see `runtime.compile_then_sync`). Progress (images done /
  total, images/s) is logged every `PROGRESS_EVERY_SECONDS`. A masks model is also scored on
  its instance masks (`segm_*` metrics) and, on panoptic data, its panoptic segmentation
  (`PQ`, `SQ`, `RQ`, and `_th` / `_st` for things and stuff); with `panoptic_dir` its
  panoptic PNGs and `predictions.json` (COCO panoptic format) go there. `batches`: the
  `eval_batches(config)` to iterate (default: built here).

  Returns:
    (metrics dict: COCO_METRIC_NAMES, `VOC_mAP50` for VOC, the mask metrics, and
    `num_images`; COCO results list; list of up to `num_images_to_draw` uint8 images with the
    detections drawn at the model's resolution; the printed tables: box, mask, PQ).
  """
  mask_scores = _MaskScores(config, info, panoptic_dir) if config.model.masks else None
  results, drawings = [], []
  num_images = 0
  image_size = tuple(config.image_size)
  batches = eval_batches(config) if batches is None else batches
  logging.info("Evaluating %d images", info.num_eval_examples)
  rate = progress.RateLog("eval", info.num_eval_examples, "images", PROGRESS_EVERY_SECONDS)
  for i, batch in enumerate(batches):
    gb = sharding.global_batch(
      {k: batch[k] for k in ("image", "orig_size", "image_id", "mask")}, mesh
    )
    if i == 0 and jax.process_count() > 1:
      name = f"eval_{next(_EVAL_RUNS)}"
      predict_fn = runtime.compile_then_sync(
        predict_fn, variables, gb["image"], gb["orig_size"], name=name
      )
    det = predict_fn(variables, gb["image"], gb["orig_size"])
    det, ids, mask, sizes = _to_host((det, gb["image_id"], gb["mask"], gb["orig_size"]))
    num_images += int(mask.sum())
    rate.update(num_images)
    results += postprocess.to_coco_results(det, ids, info.label_to_category_id, mask)
    if mask_scores is not None:
      mask_scores.add(det, ids, mask, sizes)
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
  scores, table = metrics.coco_metrics(info.coco_gt, results)
  if config.data.name == "voc":
    scores["VOC_mAP50"] = metrics.voc_map50(info.coco_gt, results)
    table += f"\nPascal VOC mAP@0.5 = {scores['VOC_mAP50']:.4f}"
  if mask_scores is not None:
    more, tables = mask_scores.finish()
    scores.update(more)
    table = "\n\n".join(["Boxes (bbox):\n" + table, *tables])
  scores["num_images"] = num_images
  return scores, results, drawings, table


def write_results(workdir, step, scores, results):
  """Writes `eval/step_{step}_{metrics,detections}.json` into the workdir (process 0 only)."""
  if jax.process_index() != 0:
    return
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  for name, obj in (("metrics", scores), ("detections", results)):
    files.write_json(os.path.join(out_dir, f"step_{step}_{name}.json"), obj)


def evaluate_and_write(
  predict_fn, variables, config, info, mesh, workdir, step, writer, batches=None
):
  """`evaluate` during training: logs the table, writes the scalars (and drawings) to
  `writer` and the JSON files of `write_results`. Returns the metrics."""
  scores, results, drawings, table = evaluate(
    predict_fn,
    variables,
    config,
    info,
    mesh,
    num_images_to_draw=config.num_eval_images_to_draw,
    batches=batches,
  )
  logging.info("Eval at step %d:\n%s", step, table)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
  if drawings:
    writer.write_images(step, {"eval/detections": np.stack(drawings)})
  write_results(workdir, step, scores, results)
  return scores


def evaluate_workdir(workdir, step=None, overrides=()):
  """Evaluates checkpoint `step` (default: latest) of a workdir with its saved config.

  Prints the COCO table (and the mask and PQ tables of a masks model), writes the metrics
  and detections JSON into `workdir/eval` (and a panoptic model's PNGs and predictions.json
  into `workdir/eval/step_N_panoptic`), and returns (metrics, step).
  """
  config = checkpoint.load_config(workdir, overrides)
  input_pipeline.check_prepared(config.data, train=False)  # before anything is built
  mesh = sharding.create_mesh()
  model, variables, step = checkpoint.restore_model(workdir, config, step, mesh)
  info = input_pipeline.get_dataset_info(config.data)
  panoptic_dir = os.path.join(workdir, "eval", f"step_{step}_panoptic")
  predict_fn = postprocess.make_predict_fn(model)
  scores, results, _, table = evaluate(
    predict_fn, variables, config, info, mesh, panoptic_dir=panoptic_dir
  )
  if jax.process_index() == 0:
    print(table)
  write_results(workdir, step, scores, results)
  return scores, step
