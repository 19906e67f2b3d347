"""Detection on image files: the program behind predict.py.

`predict_files(workdir, patterns, output_dir, ...)` restores a workdir's model, runs it on
every image in fixed-size batches (the last one padded), and writes into `output_dir`:

  detections.json          COCO results ({image_id, category_id, bbox [x, y, w, h], score})
                           plus `category_name` and `file_name`, scores >= the threshold;
  images/STEM.png          each image at its original size with the detections drawn;
  attention/STEM.png,.npz  (with `attention`) panels of the top detections' attention maps
                           (`detr_jax.attention_maps`) and the maps over the feature grid.

A masks model (`config.model.masks`) also gives, on data with stuff classes (COCO panoptic):
  panoptic/STEM.png        the COCO panoptic PNG (segment id = R + 256 G + 256^2 B) of the
                           reference's panoptic post-processing, at the original size;
  panoptic.json            its COCO panoptic annotations ({image_id, file_name,
                           segments_info}) and categories;
  and images/STEM.png shows the segments coloured. Otherwise (instance segmentation):
  masks/STEM.npz           the detections' masks at the original size (bool [n, H, W]) with
                           their scores, labels and boxes;
  each detection in detections.json carries its mask as a COCO RLE (`segmentation`), and
  images/STEM.png shows the masks under the boxes.

Images are decoded and preprocessed by the eval split's own functions
(`input_pipeline.load_image`, `input_pipeline.preprocess_eval_image`: bilinear resize of the
whole image to `config.image_size`, ImageNet normalization), and boxes are mapped back to
each image's original size. A file that cannot be decoded is logged and skipped.
"""

import collections
import concurrent.futures
import functools
import glob
import os
import time

import jax
import numpy as np
from absl import logging
from PIL import Image

import input_pipeline
from detr_jax import (
  attention_maps,
  backbone,
  checkpoint,
  files,
  panoptic,
  postprocess,
  runtime,
  sharding,
  visualize,
)

DETECTIONS_FILE = "detections.json"
IMAGES_DIR = "images"
ATTENTION_DIR = "attention"
MASKS_DIR = "masks"
PANOPTIC_DIR = "panoptic"
PANOPTIC_FILE = "panoptic.json"


# ---------------------------------------------------------------------------------------------
# Files and images.
# ---------------------------------------------------------------------------------------------
def _image_extensions():
  return {ext.lower() for ext in Image.registered_extensions()}


def list_images(patterns):
  """Image paths (sorted, without duplicates) of files, directories and glob patterns.

  A directory contributes its files with an image extension (not recursively); a file or a
  glob contributes every file it names. A pattern that names nothing is an error.
  """
  extensions = _image_extensions()
  paths = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      found = [
        os.path.join(pattern, n)
        for n in os.listdir(pattern)
        if os.path.splitext(n)[1].lower() in extensions
      ]
    else:
      found = glob.glob(pattern)
    found = [p for p in found if os.path.isfile(p)]
    if not found:
      raise FileNotFoundError(f"No image files in {pattern!r}")
    paths += found
  return sorted(set(os.path.normpath(p) for p in paths))


def image_ids(paths):
  """COCO image ids: each file's name when every name is a distinct integer (as in COCO's
  `000000000139.jpg`), otherwise 1..N in the order of `paths`."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
    return [int(s) for s in stems]
  return list(range(1, len(paths) + 1))


def _output_names(paths, ids):
  """A PNG file name per input: STEM.png, or STEM_ID.png when stems repeat."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  counts = collections.Counter(stems)
  return [f"{s}.png" if counts[s] == 1 else f"{s}_{i}.png" for s, i in zip(stems, ids)]


def _load_in_order(paths, image_size, pool, window):
  """Yields (index, original uint8 image or None, preprocessed image or the error) in order,
  with up to `window` files being decoded ahead."""

  def work(path):
    try:
      image = input_pipeline.load_image(path)
    except input_pipeline.UnreadableImageError as e:
      return None, str(e)
    return image, input_pipeline.preprocess_eval_image(image, image_size)

  pending = collections.deque()
  for i, path in enumerate(paths):
    pending.append((i, pool.submit(work, path)))
    if len(pending) >= window:
      j, future = pending.popleft()
      yield (j, *future.result())
  while pending:
    j, future = pending.popleft()
    yield (j, *future.result())


def _batches(paths, image_size, batch_size, pool, skipped):
  """Yields lists of up to `batch_size` (index, original uint8 image, preprocessed image),
  only the last one short; unreadable files are logged and appended to `skipped`."""
  batch = []
  for i, original, pre in _load_in_order(paths, image_size, pool, 2 * batch_size):
    if original is None:
      logging.warning("Skipping %s: %s", paths[i], pre)
      skipped.append((paths[i], pre))
      continue
    batch.append((i, original, pre))
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


# ---------------------------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------------------------
def make_predict_fn(model, grid=None, num_attention=0):
  """jit: (variables, images [B, H, W, 3], orig_sizes [B, 2]) -> `postprocess.predictions`,
  plus with `num_attention` > 0 the `attention_maps.select_maps` of that many top detections
  over the feature `grid` (h, w)."""
  if not num_attention:
    return postprocess.make_predict_fn(model)

  @functools.partial(jax.jit, compiler_options=runtime.compiler_options())
  def predict(variables, images, orig_sizes):
    out, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    det = postprocess.predictions(model, out, orig_sizes)
    maps = attention_maps.select_maps(
      state["intermediates"], det["scores"], out["pred_boxes"], det["queries"], grid, num_attention
    )
    return {**det, "attention": maps}

  return predict


# ---------------------------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------------------------
def _save_png(path, image):
  files.write_atomic(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def _save_drawing(output_dir, name, image, det, b, class_names, score_threshold):
  """images/NAME: image `b` of a batch at its original size with its detections drawn."""
  drawing = visualize.draw_detections(
    image, det["boxes"][b], det["labels"][b], det["scores"][b], class_names, score_threshold
  )
  _save_png(os.path.join(output_dir, IMAGES_DIR, name), drawing)


def _save_attention(output_dir, name, image, det, b, maps, score_threshold, class_names):
  """attention/NAME.png and .npz: the attention panel and maps of image `b` of a batch (top
  queries at or above the threshold; at least the best one)."""
  out_dir = os.path.join(output_dir, ATTENTION_DIR)
  top = maps["detections"][b]
  scores = det["scores"][b, top]
  keep = scores >= score_threshold
  keep[0] = True
  top, queries = top[keep], maps["queries"][b][keep]
  boxes = det["boxes"][b, top]
  labels = det["labels"][b, top]
  h, w = image.shape[:2]
  gh, gw = maps["decoder"].shape[-2:]
  cells = maps["cells"][b][keep]
  points = np.stack([(cells[:, 1] + 0.5) * w / gw, (cells[:, 0] + 0.5) * h / gh], axis=-1)
  decoder, encoder = maps["decoder"][b][keep], maps["encoder"][b][keep]
  panel = attention_maps.draw_panel(
    image, boxes, labels, scores[keep], class_names, decoder, encoder, points
  )
  stem = os.path.splitext(name)[0]
  _save_png(os.path.join(out_dir, name), panel)
  files.write_atomic(
    os.path.join(out_dir, stem + ".npz"),
    lambda f: np.savez_compressed(
      f,
      queries=queries,
      scores=scores[keep],
      labels=labels,
      boxes=boxes,
      cells=cells,
      points=points,
      decoder=decoder,
      encoder=encoder,
    ),
  )


def predict_files(
  workdir,
  patterns,
  output_dir,
  *,
  step=None,
  score_threshold=0.5,
  batch_size=8,
  attention=False,
  num_attention=3,
  overrides=(),
):
  """Detects objects in image files with a workdir's checkpoint (see the module docstring).

  Returns:
    dict: `step`, `num_images` (processed), `num_detections` (in the JSON), `skipped` (list of
    (path, reason) for files that could not be read).
  """
  # ---- Model, classes, files -----------------------------------------------------------
  overrides = list(overrides)
  if attention:
    overrides.append("model.attention=xla")  # "cudnn" computes no attention probabilities
  mesh = sharding.create_mesh()
  config = checkpoint.load_config(workdir, overrides)
  model, variables, step = checkpoint.restore_model(workdir, config, step, mesh)
  labels = input_pipeline.label_space(config.data)  # no image or TFDS data is read
  image_size = tuple(int(v) for v in config.image_size)
  stride = backbone.output_stride(config.model.dilation)
  grid = (image_size[0] // stride, image_size[1] // stride)
  k = min(num_attention, config.model.num_queries) if attention else 0
  predict = make_predict_fn(model, grid, k)
  n_dev = jax.device_count()
  if batch_size % n_dev:
    batch_size += n_dev - batch_size % n_dev
    logging.info("Batch size rounded up to %d, a multiple of the %d devices", batch_size, n_dev)
  mode = _mask_mode(config, labels)
  paths = list_images(patterns)
  ids = image_ids(paths)
  names = _prepare_output_dir(output_dir, paths, ids, attention, mode)
  logging.info("Predicting %d images with %s step %d", len(paths), workdir, step)

  # ---- Batches -------------------------------------------------------------------------
  results, skipped, writes, panoptic_annotations = [], [], collections.deque(), []
  progress = _Progress(len(paths))
  data_sharding = sharding.data_sharding(mesh)
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    for batch in _batches(paths, image_size, batch_size, pool, skipped):
      images = np.zeros((batch_size, *image_size, 3), np.float32)
      sizes = np.ones((batch_size, 2), np.int32)
      for b, (_, original, pre) in enumerate(batch):
        images[b], sizes[b] = pre, original.shape[:2]
      det = predict(variables, jax.device_put(images, data_sharding), sizes)
      det = jax.tree.map(np.asarray, jax.device_get(det))
      maps = det.pop("attention", None)
      batch_ids = np.array([ids[i] for i, _, _ in batch] + [0] * (batch_size - len(batch)))
      mask = np.arange(batch_size) < len(batch)
      batch_results = postprocess.to_coco_results(det, batch_ids, labels.label_to_category_id, mask)
      n = det["scores"].shape[1]
      for b, (i, original, _) in enumerate(batch):
        keep = np.flatnonzero(det["scores"][b] >= score_threshold)
        kept = [batch_results[b * n + q] for q in keep]
        picture, annotation = _mask_outputs(
          mode, output_dir, names[i], ids[i], original, det, b, keep, kept, labels, image_size
        )
        results += kept
        panoptic_annotations += [annotation] if annotation else []
        drawing = (picture, det, b, labels.class_names, score_threshold)
        writes.append(pool.submit(_save_drawing, output_dir, names[i], *drawing))
        if maps is not None:
          panel = (original, det, b, maps, score_threshold, labels.class_names)
          writes.append(pool.submit(_save_attention, output_dir, names[i], *panel))
      while len(writes) > 4 * batch_size:  # bounds the memory of pending drawings
        writes.popleft().result()
      progress.update(len(batch), len(skipped))
    while writes:
      writes.popleft().result()

  # ---- Detections JSON -----------------------------------------------------------------
  _write_detections(output_dir, results, paths, ids, labels)
  if mode == "panoptic":
    files.write_json(
      os.path.join(output_dir, PANOPTIC_FILE),
      {"annotations": panoptic_annotations, "categories": labels.panoptic_categories()},
    )
  logging.info(
    "Wrote %d detections of %d images to %s; skipped %d unreadable file(s)%s",
    len(results),
    progress.done,
    output_dir,
    len(skipped),
    "".join(f"\n  {p}: {why}" for p, why in skipped),
  )
  return {
    "step": step,
    "num_images": progress.done,
    "num_detections": len(results),
    "skipped": skipped,
  }


def _mask_mode(config, labels):
  """What a model's masks become: None (a box model), "panoptic" (a softmax masks model on
  data with stuff classes) or "instance"."""
  if not config.model.masks:
    return None
  stuff = [n for n, t in zip(labels.class_names, labels.is_thing) if not t and n != "N/A"]
  return "panoptic" if stuff and config.model.classifier == "softmax" else "instance"


def _mask_outputs(mode, output_dir, name, image_id, image, det, b, keep, kept, labels, size):
  """The mask outputs of image `b` of a batch (see the module docstring): writes its masks or
  panoptic PNG, adds the masks of detections `keep` to their results `kept`; returns (the
  picture to draw the boxes on, its COCO panoptic annotation or None). `size`: the model's
  input size."""
  if mode == "instance":
    binary = _instance_masks(output_dir, name, det, b, size, image.shape)
    for r, q in zip(kept, keep):
      r["segmentation"] = _rle(binary[q])
    order = keep[np.argsort(det["scores"][b][keep])]  # the best drawn last, on top
    return visualize.draw_masks(image, binary[order], det["labels"][b][order]), None
  if mode == "panoptic":
    ann, ids = _panoptic(output_dir, name, image_id, det, b, size, image.shape, labels)
    label_of = {int(c): k for k, c in enumerate(labels.label_to_category_id)}
    return visualize.draw_panoptic(image, ids, ann["segments_info"], label_of), ann
  return image, None


def _instance_masks(output_dir, name, det, b, image_size, shape):
  """masks/STEM.npz of image `b`: its detections' masks at the original size, sorted by
  score like the detections, with their scores, labels and boxes; returns the masks."""
  binary = postprocess.instance_masks(det["masks"][b], image_size, shape[:2])
  stem = os.path.splitext(name)[0]
  path = os.path.join(output_dir, MASKS_DIR, stem + ".npz")
  arrays = dict(
    masks=binary, scores=det["scores"][b], labels=det["labels"][b], boxes=det["boxes"][b]
  )
  files.write_atomic(path, lambda f: np.savez_compressed(f, **arrays))
  return binary


def _rle(mask):
  """A bool [H, W] mask as COCO RLE with the counts as a string."""
  from pycocotools import mask as mask_utils

  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": rle["size"], "counts": rle["counts"].decode()}


def _panoptic(output_dir, name, image_id, det, b, image_size, shape, labels):
  """panoptic/STEM.png of image `b` (the reference's panoptic post-processing); returns its
  COCO panoptic annotation and the id map."""
  ids, segments = panoptic.postprocess_panoptic(
    det["logits"][b],
    det["masks"][b],
    image_size,
    shape[:2],
    labels.is_thing,
    labels.label_to_category_id,
  )
  panoptic.write_panoptic_png(os.path.join(output_dir, PANOPTIC_DIR, name), ids)
  return {"image_id": int(image_id), "file_name": name, "segments_info": segments}, ids


def _prepare_output_dir(output_dir, paths, ids, attention, mask_mode):
  """Creates the output folders; returns the PNG name of each input. Refuses to write over
  an input image."""
  names = _output_names(paths, ids)
  inputs = {os.path.realpath(p) for p in paths}
  subs = {None: [], "instance": [MASKS_DIR], "panoptic": [PANOPTIC_DIR]}[mask_mode]
  for sub in [IMAGES_DIR] + ([ATTENTION_DIR] if attention else []) + subs:
    os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
  for name in names:
    if os.path.realpath(os.path.join(output_dir, IMAGES_DIR, name)) in inputs:
      raise ValueError(f"Output {name} in {output_dir} would overwrite an input image")
  return names


class _Progress:
  """Logs images done / total and the rate, every 10 s and at the end."""

  def __init__(self, total):
    self.total, self.done = total, 0
    self._start, self._last = time.time(), 0.0

  def update(self, done, skipped):
    self.done += done
    now = time.time()
    if now - self._last > 10 or self.done + skipped == self.total:
      self._last = now
      logging.info(
        "Predicted %d/%d images (%d skipped, %.1f images/s)",
        self.done + skipped,
        self.total,
        skipped,
        self.done / max(now - self._start, 1e-9),
      )


def _write_detections(output_dir, results, paths, ids, labels):
  """detections.json: the COCO results plus each one's category name and file name."""
  cat_names = {int(c): n for c, n in zip(labels.label_to_category_id, labels.class_names)}
  file_names = {ids[i]: os.path.basename(p) for i, p in enumerate(paths)}
  for r in results:
    r["category_name"] = cat_names[r["category_id"]]
    r["file_name"] = file_names[r["image_id"]]
  files.write_json(os.path.join(output_dir, DETECTIONS_FILE), results)
