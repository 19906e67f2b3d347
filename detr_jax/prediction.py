"""Detection on image files: the program behind predict.py.

`predict_files(workdir, patterns, output_dir, ...)` restores a workdir's model, runs it on
every image in fixed-size batches (the last one padded), and writes into `output_dir`:

  detections.json          COCO results ({image_id, category_id, bbox [x, y, w, h], score})
                           plus `category_name` and `file_name`, scores >= the threshold;
  images/STEM.png          each image at its original size with the detections drawn;
  attention/STEM.png,.npz  (with `attention`) panels of the top detections' attention maps
                           (`detr_jax.attention_maps`) and the maps over the feature grid.

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
  postprocess,
  runtime,
  sharding,
  visualize,
)

DETECTIONS_FILE = "detections.json"
IMAGES_DIR = "images"
ATTENTION_DIR = "attention"


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
  """jit: (variables, images [B, H, W, 3], orig_sizes [B, 2]) -> `postprocess.detections`,
  plus with `num_attention` > 0 the `attention_maps.select_maps` of that many top detections
  over the feature `grid` (h, w)."""
  if not num_attention:
    return postprocess.make_predict_fn(model)

  @functools.partial(jax.jit, compiler_options=runtime.compiler_options())
  def predict(variables, images, orig_sizes):
    out, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    det = postprocess.detections(model, out, orig_sizes)
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
  paths = list_images(patterns)
  ids = image_ids(paths)
  names = _prepare_output_dir(output_dir, paths, ids, attention)
  logging.info("Predicting %d images with %s step %d", len(paths), workdir, step)

  # ---- Batches -------------------------------------------------------------------------
  results, skipped, writes = [], [], collections.deque()
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
      results += [
        r
        for r in postprocess.to_coco_results(det, batch_ids, labels.label_to_category_id, mask)
        if r["score"] >= score_threshold
      ]
      for b, (i, original, _) in enumerate(batch):
        drawing = (original, det, b, labels.class_names, score_threshold)
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


def _prepare_output_dir(output_dir, paths, ids, attention):
  """Creates the output folders; returns the PNG name of each input. Refuses to write over
  an input image."""
  names = _output_names(paths, ids)
  inputs = {os.path.realpath(p) for p in paths}
  for sub in [IMAGES_DIR] + ([ATTENTION_DIR] if attention else []):
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
