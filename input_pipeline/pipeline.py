"""Training and evaluation pipelines: sources -> per-example transforms -> static-shape batches.

See the `input_pipeline` package docstring for the API, the augmentation chain and what
happens to bad input.
"""

import collections
import dataclasses
import json
import logging
import threading
from typing import Any

import numpy as np
import tensorflow as tf

from input_pipeline import sources
from input_pipeline import transforms as T

# Salt of the per-example augmentation keys, so they differ from the shuffling seeds.
_AUGMENT_SALT = 0x0A06
# Train stream 0 is the epoch order; 1..3 supply the mosaic partners.
_MOSAIC_PARTNERS = 3

_SOURCES = {}
_SOURCES_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetInfo:
  """What the rest of the program needs to know about the data.

  Attributes:
    num_classes: K, the model's number of classes (labels are 0..K-1).
    label_to_category_id: int64 `[K]`, the COCO category id of each label (for results).
    class_names: K names (COCO with category ids as labels: "N/A" for unused ids).
    num_train_examples: usable training images (all hosts together); TFDS sources count
      them on first access (evaluation alone never reads the training splits).
    num_eval_examples: usable eval images (all hosts together).
    counters: what loading skipped or changed, e.g. {'train/skipped_images': 2,
      'train/invalid_boxes': 1, 'train/clipped_boxes': 3, 'eval/images_without_annotations':
      5, ...}; every skip is also logged with file names and annotation ids. The dict is the
      source's own: TFDS sources add 'eval/invalid_boxes' when `coco_gt` is first built.
    coco_gt: COCO-format json (dict) of the eval split, for `pycocotools.coco.COCO`; TFDS
      sources build it on first access with one pass over the eval split.
  """

  num_classes: int
  label_to_category_id: np.ndarray
  class_names: list
  counters: dict
  _source: Any = dataclasses.field(repr=False, compare=False)

  @property
  def num_train_examples(self):
    return self._source.num_train_examples

  @property
  def num_eval_examples(self):
    return self._source.num_eval_examples

  @property
  def coco_gt(self):
    return self._source.coco_gt()


def _get_source(data_config):
  """The source of a data config, built once per process (loading may take seconds)."""
  key = json.dumps(data_config.to_dict(), sort_keys=True, default=str)
  with _SOURCES_LOCK:
    if key not in _SOURCES:
      _SOURCES[key] = sources.build_source(data_config)
    return _SOURCES[key]


def get_dataset_info(data_config):
  """The `DatasetInfo` of `config.data` (loads and validates annotations on first use)."""
  source = _get_source(data_config)
  return DatasetInfo(
    num_classes=source.labels.num_classes,
    label_to_category_id=source.labels.label_to_category_id,
    class_names=list(source.labels.class_names),
    counters=source.counters,
    _source=source,
  )


# ---------------------------------------------------------------------------------------------
# Per-example transforms.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The augmentation fields of `config.data` (see configs/base.py for their meaning)."""

  hflip_prob: float
  crop_prob: float
  crop_resize_sizes: tuple
  crop_min_size: int
  crop_max_size: int
  min_visible_fraction: float
  mosaic_prob: float
  mosaic_crop_prob: float
  mosaic_crop_min_fraction: float
  photometric: bool
  photometric_prob: float

  @classmethod
  def from_data_config(cls, cfg):
    return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


def _objects(record, size):
  """Training/eval objects of a record: non-crowd, finite, positive area after clipping.

  Returns:
    (boxes `[m, 4]` xyxy pixels, labels int32 `[m]`, number of invalid non-crowd boxes).
  """
  s = tf.cast(size, tf.float32)
  boxes = record["boxes"] * tf.stack([s[1], s[0], s[1], s[0]])
  boxes, ok = T.sanitize_boxes(boxes, size)
  invalid = tf.reduce_sum(tf.cast(~ok & ~record["crowd"], tf.int32))
  keep = ok & ~record["crowd"]
  return tf.boolean_mask(boxes, keep), tf.boolean_mask(record["labels"], keep), invalid


def _make_place(aug):
  """Builds `place(record, key, out_size, offset, in_mosaic)`, the per-image step shared by
  single images and the four parts of a mosaic.

  `place` decodes a record's image, flips it with `hflip_prob`, crops it (single image: with
  `crop_prob`, a random-size crop of the reference chain; mosaic part: with
  `mosaic_crop_prob`, a crop with sides in [mosaic_crop_min_fraction, 1]), applies the
  optional photometric distortion, normalizes it and resizes it to `out_size`. It returns
  (image float32 `[*out_size, 3]` normalized, boxes `[m, 4]` xyxy in pixels of the canvas it
  is placed on (shifted by `offset`), labels `[m]`, number of invalid source boxes).

  It is one `tf.function`, so a mosaic pipeline traces it once instead of five times.
  """

  def sample_window(in_mosaic):
    def sample(key, size):
      k_size, k_fraction = T.split_key(key, 2)
      size_crop = T.sample_size_crop(
        k_size,
        size,
        resize_sizes=aug.crop_resize_sizes,
        min_size=aug.crop_min_size,
        max_size=aug.crop_max_size,
      )
      fraction_crop = T.sample_fraction_crop(
        k_fraction, size, min_fraction=aug.mosaic_crop_min_fraction
      )
      return tf.where(in_mosaic, fraction_crop, size_crop)

    return sample

  @tf.function(autograph=False, reduce_retracing=True)
  def place(record, key, out_size, offset, in_mosaic):
    size = T.image_size(record["image"], record["size"])
    boxes, labels, invalid = _objects(record, size)
    k_flip, k_crop, k_photo = T.split_key(key, 3)
    flip = T.uniform(k_flip) < aug.hflip_prob
    crop_prob = tf.where(in_mosaic, aug.mosaic_crop_prob, aug.crop_prob)
    window, boxes, keep = T.maybe_crop(
      k_crop, crop_prob, size, boxes, sample_window(in_mosaic), aug.min_visible_fraction
    )
    boxes = tf.boolean_mask(boxes, keep)
    labels = tf.boolean_mask(labels, keep)
    crop = T.decode_window(record["image"], window)
    crop = tf.cond(flip, lambda: tf.reverse(crop, [1]), lambda: crop)
    distort = None
    if aug.photometric:
      distort = lambda x: T.photometric_distort(k_photo, x, aug.photometric_prob)
    image = T.resize_and_normalize(crop, out_size, distort)
    window_size = tf.stack([window[2] - window[0], window[3] - window[1]])
    boxes = T.scale_flip_shift_boxes(boxes, window_size, out_size, flip, offset)
    return image, boxes, labels, invalid

  return place


def _single(place, record, key, out_size):
  """The reference chain on one image: flip, maybe crop, resize to `out_size`."""
  return place(record, key, tf.constant(out_size), tf.constant([0, 0]), tf.constant(False))


def _mosaic(place, records, key, out_size, aug):
  """Four images in a 2x2 grid of `out_size`, then the crop step of the reference chain.

  Each image is flipped, maybe cropped and resized to its quadrant by `place` (the seed
  re-implementation resizes to a 400 x 400 quadrant of an 800 x 800 mosaic that the final
  resize then scales; here the mosaic has the output size directly, and each part is flipped
  on its own rather than the whole mosaic).
  """
  h, w = out_size
  rows, cols = (h // 2, h - h // 2), (w // 2, w - w // 2)
  keys = T.split_key(key, len(records) + 1)
  images, boxes, labels, invalid = [], [], [], 0
  for q, record in enumerate(records):
    r, c = divmod(q, 2)
    image, b, lab, inv = place(
      record,
      keys[q],
      tf.constant([rows[r], cols[c]]),
      tf.constant([r * rows[0], c * cols[0]]),
      tf.constant(True),
    )
    images.append(image)
    boxes.append(b)
    labels.append(lab)
    invalid += inv
  canvas = tf.concat([tf.concat(images[0:2], axis=1), tf.concat(images[2:4], axis=1)], axis=0)
  boxes = tf.concat(boxes, axis=0)
  labels = tf.concat(labels, axis=0)
  size = tf.constant([h, w], tf.int32)
  sample = lambda k, s: T.sample_size_crop(
    k, s, resize_sizes=aug.crop_resize_sizes, min_size=aug.crop_min_size, max_size=aug.crop_max_size
  )
  window, boxes, keep = T.maybe_crop(
    keys[-1], aug.crop_prob, size, boxes, sample, aug.min_visible_fraction
  )
  image = T.resize(canvas[window[0] : window[2], window[1] : window[3]], out_size)
  window_size = tf.stack([window[2] - window[0], window[3] - window[1]])
  boxes = T.scale_flip_shift_boxes(
    tf.boolean_mask(boxes, keep), window_size, out_size, tf.constant(False)
  )
  return image, boxes, tf.boolean_mask(labels, keep), invalid


def _finish(image, boxes, labels, out_size, max_boxes):
  """Clipped, non-degenerate, normalized and padded targets; the image with a static shape."""
  boxes, ok = T.sanitize_boxes(boxes, tf.constant(out_size, tf.int32))
  boxes = T.xyxy_to_normalized_cxcywh(tf.boolean_mask(boxes, ok), out_size)
  targets = T.pad_targets(boxes, tf.boolean_mask(labels, ok), max_boxes)
  return dict(
    image=tf.ensure_shape(image, [*out_size, 3]),
    boxes=targets["boxes"],
    labels=targets["labels"],
    valid=targets["valid"],
    _truncated_boxes=targets["num_truncated"],
  )


def make_train_example_fn(load, aug, out_size, max_boxes, seed):
  """fn(key position, record, *partner records) -> one training example (see the package
  docstring for its keys); the randomness is a function of (seed, key position) only."""
  base_key = tf.constant([seed, _AUGMENT_SALT], tf.int64)
  place = _make_place(aug)

  def fn(pos, record, *partners):
    key = tf.random.experimental.stateless_fold_in(base_key, pos)
    k_choice, k_single, k_mosaic = T.split_key(key, 3)
    single = lambda: _single(place, load(record), k_single, out_size)
    if partners:
      records = lambda: [load(r) for r in (record, *partners)]
      mosaic = lambda: _mosaic(place, records(), k_mosaic, out_size, aug)
      image, boxes, labels, invalid = tf.cond(T.uniform(k_choice) < aug.mosaic_prob, mosaic, single)
    else:
      image, boxes, labels, invalid = single()
    out = _finish(image, boxes, labels, out_size, max_boxes)
    out["_invalid_boxes"] = invalid
    return out

  return fn


def make_eval_example_fn(load, out_size, max_boxes):
  """fn(record, mask) -> one eval example: the whole image resized to `out_size`, plus
  image_id, orig_size and mask (padding examples are zeros with mask False)."""

  def real(record):
    record = load(record)
    size = T.image_size(record["image"], record["size"])
    boxes, labels, invalid = _objects(record, size)
    image = T.eval_image(T.decode_window(record["image"], T.full_window(size)), out_size)
    scale = tf.cast(out_size, tf.float32) / tf.cast(size, tf.float32)
    boxes = boxes * tf.stack([scale[1], scale[0], scale[1], scale[0]])
    out = _finish(image, boxes, labels, out_size, max_boxes)
    out.update(image_id=record["image_id"], orig_size=size, _invalid_boxes=invalid)
    return out

  def padding():
    return dict(
      image=tf.zeros([*out_size, 3], tf.float32),
      boxes=tf.zeros([max_boxes, 4], tf.float32),
      labels=tf.zeros([max_boxes], tf.int32),
      valid=tf.zeros([max_boxes], tf.bool),
      _truncated_boxes=tf.constant(0, tf.int32),
      image_id=tf.constant(0, tf.int64),
      orig_size=tf.zeros([2], tf.int32),
      _invalid_boxes=tf.constant(0, tf.int32),
    )

  def fn(record, mask):
    out = tf.cond(mask, lambda: real(record), padding)
    out["mask"] = mask
    return out

  return fn


# ---------------------------------------------------------------------------------------------
# Datasets and iterators.
# ---------------------------------------------------------------------------------------------
def _options():
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def _hosts(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # only when the caller does not say

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  return process_index, process_count


def _local_batch(global_batch_size, process_count):
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}."
    )
  return global_batch_size // process_count


def build_train_dataset(
  data_config, *, image_size, global_batch_size, seed, start_step, process_index, process_count
):
  """The endless tf.data pipeline behind `create_train_iterator` (batches of tensors)."""
  source = _get_source(data_config)
  b = _local_batch(global_batch_size, process_count)
  aug = AugmentConfig.from_data_config(data_config)
  out_size = tuple(int(v) for v in image_size)
  streams = 1 + (_MOSAIC_PARTNERS if aug.mosaic_prob > 0 else 0)
  common = dict(
    start=start_step * b,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    local_batch=b,
    global_batch=global_batch_size,
  )
  # Each stream yields (key position, record); the example's key position is the main one's.
  ds = tf.data.Dataset.zip(tuple(source.train_records(stream=s, **common) for s in range(streams)))
  fn = make_train_example_fn(source.loader("train"), aug, out_size, data_config.max_boxes, seed)
  ds = ds.map(
    T.no_autograph(lambda main, *partners: fn(*main, *[record for _, record in partners])),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.batch(b, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def build_eval_dataset(data_config, *, image_size, global_batch_size, process_index, process_count):
  """The finite tf.data pipeline behind `create_eval_iterator` (batches of tensors)."""
  source = _get_source(data_config)
  b = _local_batch(global_batch_size, process_count)
  out_size = tuple(int(v) for v in image_size)
  ds = source.eval_records(process_index=process_index, process_count=process_count, local_batch=b)
  fn = make_eval_example_fn(source.loader("eval"), out_size, data_config.max_boxes)
  ds = ds.map(T.no_autograph(fn), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(b, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


class _Batches:
  """NumPy batches of a tf.data pipeline, with counters.

  `counters` (a dict) holds, summed over the batches yielded so far:
    examples: real examples yielded (padding excluded);
    truncated_boxes: objects beyond `max_boxes`, dropped;
    invalid_boxes: non-crowd boxes of the source that are NaN/infinite or have no area inside
      the image, dropped (COCO folders drop these when loading, counted in
      `DatasetInfo.counters`; TFDS data is checked here).
  The first time an object is dropped a warning is logged, later every 1000 batches.
  """

  def __init__(self, dataset, name, max_boxes):
    self.dataset = dataset
    self._name = name
    self._max_boxes = max_boxes
    self._batches = 0
    self.counters = collections.Counter(examples=0, truncated_boxes=0, invalid_boxes=0)

  def _strip(self, batch):
    truncated = int(batch.pop("_truncated_boxes").sum())
    invalid = int(batch.pop("_invalid_boxes").sum())
    mask = batch.get("mask")
    self.counters["examples"] += int(mask.sum()) if mask is not None else len(batch["image"])
    if truncated and not self.counters["truncated_boxes"]:
      logging.warning(
        "%s: an image has more than max_boxes=%d objects; extra objects are dropped "
        "(counted in .counters['truncated_boxes']).",
        self._name,
        self._max_boxes,
      )
    if invalid and not self.counters["invalid_boxes"]:
      logging.warning(
        "%s: dropping source boxes that are NaN or have no area inside the image "
        "(counted in .counters['invalid_boxes']).",
        self._name,
      )
    self.counters["truncated_boxes"] += truncated
    self.counters["invalid_boxes"] += invalid
    self._batches += 1
    if self._batches % 1000 == 0 and (self.counters["truncated_boxes"] or invalid):
      logging.info("%s counters after %d batches: %s", self._name, self._batches, self.counters)
    return batch


class TrainIterator(_Batches):
  """Endless iterator of training batches (`next(it)`); see `_Batches` for `counters`."""

  def __init__(self, dataset, name, max_boxes):
    super().__init__(dataset, name, max_boxes)
    self._iterator = iter(dataset.as_numpy_iterator())

  def __iter__(self):
    return self

  def __next__(self):
    return self._strip(next(self._iterator))


class EvalBatches(_Batches):
  """Finite iterable of eval batches: each `iter()` is one full pass; see `_Batches`."""

  def __iter__(self):
    for batch in self.dataset.as_numpy_iterator():
      yield self._strip(batch)


def create_train_iterator(
  data_config,
  *,
  image_size,
  global_batch_size,
  seed,
  start_step=0,
  process_index=None,
  process_count=None,
):
  """An endless iterator of this host's training batches (see the package docstring)."""
  process_index, process_count = _hosts(process_index, process_count)
  ds = build_train_dataset(
    data_config,
    image_size=image_size,
    global_batch_size=global_batch_size,
    seed=seed,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
  )
  return TrainIterator(ds, "train", data_config.max_boxes)


def create_eval_iterator(
  data_config, *, image_size, global_batch_size, process_index=None, process_count=None
):
  """A finite iterable of this host's eval batches, one pass each time it is iterated."""
  process_index, process_count = _hosts(process_index, process_count)
  ds = build_eval_dataset(
    data_config,
    image_size=image_size,
    global_batch_size=global_batch_size,
    process_index=process_index,
    process_count=process_count,
  )
  return EvalBatches(ds, "eval", data_config.max_boxes)
