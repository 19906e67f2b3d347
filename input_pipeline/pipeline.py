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

from input_pipeline import masks as M
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
      sources build it on first access with one pass over the eval split. With `data.masks`
      its annotations carry `segmentation` (RLE) for `segm` evaluation (synthetic,
      coco_folder).
    is_thing: bool `[K]`, whether each class is a thing (False: stuff, and "N/A" classes);
      what the panoptic post-processing needs. Detection data: True but for "N/A".
    panoptic_gt: `panoptic_format.PanopticGroundTruth` of the eval split (segments_info json,
      the PNG folder or `id_map(image_id)`), for PQ: synthetic, coco_panoptic and
      coco_panoptic_folder; None for the other sources.
  """

  num_classes: int
  label_to_category_id: np.ndarray
  class_names: list
  counters: dict
  is_thing: np.ndarray
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

  @property
  def panoptic_gt(self):
    return self._source.panoptic_gt()


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
    is_thing=source.labels.is_thing,
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


def _objects(record, size, with_masks):
  """Training/eval objects of a record: non-crowd, finite, positive area after clipping, and
  (`with_masks`) a mask with at least one pixel.

  Returns:
    (boxes `[m, 4]` xyxy pixels, labels int32 `[m]`, number of invalid non-crowd boxes,
    masks uint8 `[m, h, w]` or None, number of non-crowd objects with a valid box and an empty
    mask or 0).
  """
  s = tf.cast(size, tf.float32)
  boxes = record["boxes"] * tf.stack([s[1], s[0], s[1], s[0]])
  boxes, ok = T.sanitize_boxes(boxes, size)
  invalid = tf.reduce_sum(tf.cast(~ok & ~record["crowd"], tf.int32))
  keep = ok & ~record["crowd"]
  if not with_masks:
    return tf.boolean_mask(boxes, keep), tf.boolean_mask(record["labels"], keep), invalid, None, 0
  masks = record["masks"]
  check = tf.debugging.assert_equal(
    tf.shape(masks)[1:], size, message="the masks (panoptic PNG) and the image differ in size"
  )
  with tf.control_dependencies([check]):
    has_pixels = tf.reduce_any(masks > 0, axis=[1, 2])
  empty = tf.reduce_sum(tf.cast(keep & ~has_pixels, tf.int32))
  keep &= has_pixels
  return (
    tf.boolean_mask(boxes, keep),
    tf.boolean_mask(record["labels"], keep),
    invalid,
    tf.boolean_mask(masks, keep),
    empty,
  )


def _make_place(aug, with_masks):
  """Builds `place(record, key, out_size, offset, in_mosaic)`, the per-image step shared by
  single images and the four parts of a mosaic.

  `place` decodes a record's image, flips it with `hflip_prob`, crops it (single image: with
  `crop_prob`, a random-size crop of the reference chain; mosaic part: with
  `mosaic_crop_prob`, a crop with sides in [mosaic_crop_min_fraction, 1]), applies the
  optional photometric distortion, normalizes it and resizes it to `out_size`. It returns
  (image float32 `[*out_size, 3]` normalized, boxes `[m, 4]` xyxy in pixels of the canvas it
  is placed on (shifted by `offset`), labels `[m]`, number of invalid source boxes) and, with
  `with_masks`, (masks uint8 `[m, wh, ww]`: the objects' source pixels in the crop window,
  flipped with the image; number of objects dropped for an empty mask); the caller resamples
  the masks (`M.resample`) to wherever the window's pixels end up.

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
    boxes, labels, invalid, masks, empty_masks = _objects(record, size, with_masks)
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
    if not with_masks:
      return image, boxes, labels, invalid
    masks = tf.boolean_mask(masks, keep)[:, window[0] : window[2], window[1] : window[3]]
    masks = tf.cond(flip, lambda: tf.reverse(masks, [2]), lambda: masks)
    return image, boxes, labels, invalid, masks, empty_masks

  return place


def _single(place, record, key, out_size, mask_stride):
  """The reference chain on one image: flip, maybe crop, resize to `out_size`; masks (with a
  `mask_stride`) resampled from the window to `out_size // mask_stride`."""
  out = place(record, key, tf.constant(out_size), tf.constant([0, 0]), tf.constant(False))
  if mask_stride is None:
    return out
  image, boxes, labels, invalid, masks, empty_masks = out
  masks = _resample_part(masks, out_size, mask_stride, (0, 0, *out_size), (0, 0, *out_size))
  return image, boxes, labels, invalid, masks, empty_masks


def _resample_part(masks, out_size, stride, window, part):
  """Masks `[m, wh, ww]` of a source window placed at `part` = (y0, x0, h, w) of a canvas
  whose `window` = (y0, x0, h, w) is resized to `out_size` -> uint8 `[m, H / s, W / s]`."""
  (h, w), s = out_size, stride
  ys = M.edges(h // s, s, window[0], window[2], h, part[0], part[2], tf.shape(masks)[1])
  xs = M.edges(w // s, s, window[1], window[3], w, part[1], part[3], tf.shape(masks)[2])
  return tf.ensure_shape(M.resample(masks, ys, xs), [None, h // s, w // s])


def _mosaic(place, records, key, out_size, aug, mask_stride):
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
  parts, empty_masks = [], 0  # (masks, (y0, x0, h, w) on the canvas) of each image
  for q, record in enumerate(records):
    r, c = divmod(q, 2)
    image, b, lab, inv, *with_masks = place(
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
    if mask_stride is not None:
      parts.append((with_masks[0], (r * rows[0], c * cols[0], rows[r], cols[c])))
      empty_masks += with_masks[1]
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
  if mask_stride is None:
    return image, boxes, tf.boolean_mask(labels, keep), invalid
  # Each part's masks go from its source window to the output in one resampling.
  crop = (window[0], window[1], window_size[0], window_size[1])
  masks = tf.concat(
    [_resample_part(m, out_size, mask_stride, crop, part) for m, part in parts], axis=0
  )
  return (
    image,
    boxes,
    tf.boolean_mask(labels, keep),
    invalid,
    tf.boolean_mask(masks, keep),
    empty_masks,
  )


def _finish(image, boxes, labels, out_size, max_boxes, masks=None):
  """Clipped, non-degenerate, normalized and padded targets; the image with a static shape;
  `masks` (uint8 `[n, Hm, Wm]`, one per box) padded alongside."""
  boxes, ok = T.sanitize_boxes(boxes, tf.constant(out_size, tf.int32))
  kept = T.xyxy_to_normalized_cxcywh(tf.boolean_mask(boxes, ok), out_size)
  targets = T.pad_targets(kept, tf.boolean_mask(labels, ok), max_boxes)
  out = dict(
    image=tf.ensure_shape(image, [*out_size, 3]),
    boxes=targets["boxes"],
    labels=targets["labels"],
    valid=targets["valid"],
    _truncated_boxes=targets["num_truncated"],
  )
  if masks is not None:
    out["masks"] = M.pad(masks, ok, max_boxes, masks.shape[1:])
  return out


def mask_size(image_size, mask_stride):
  """(Hm, Wm) of the masks of `data.mask_stride` at `image_size` (which it must divide)."""
  h, w = (int(v) for v in image_size)
  if mask_stride < 1 or h % mask_stride or w % mask_stride:
    raise ValueError(
      f"data.mask_stride={mask_stride} must be a positive divisor of both sides of "
      f"config.image_size={(h, w)}."
    )
  return h // mask_stride, w // mask_stride


def make_train_example_fn(load, aug, out_size, max_boxes, seed, mask_stride=None):
  """fn(key position, record, *partner records) -> one training example (see the package
  docstring for its keys); the randomness is a function of (seed, key position) only.
  `mask_stride`: records carry `masks`, the examples get them at `out_size // mask_stride`;
  None: no masks."""
  base_key = tf.constant([seed, _AUGMENT_SALT], tf.int64)
  place = _make_place(aug, with_masks=mask_stride is not None)
  if mask_stride is not None:
    mask_size(out_size, mask_stride)

  def fn(pos, record, *partners):
    key = tf.random.experimental.stateless_fold_in(base_key, pos)
    k_choice, k_single, k_mosaic = T.split_key(key, 3)
    single = lambda: _single(place, load(record), k_single, out_size, mask_stride)
    if partners:
      records = lambda: [load(r) for r in (record, *partners)]
      mosaic = lambda: _mosaic(place, records(), k_mosaic, out_size, aug, mask_stride)
      image, boxes, labels, invalid, *masks = tf.cond(
        T.uniform(k_choice) < aug.mosaic_prob, mosaic, single
      )
    else:
      image, boxes, labels, invalid, *masks = single()
    out = _finish(image, boxes, labels, out_size, max_boxes, *masks[:1])
    out["_invalid_boxes"] = invalid
    if masks:
      out["_invalid_masks"] = masks[1]
    return out

  return fn


def make_eval_example_fn(load, out_size, max_boxes, mask_stride=None):
  """fn(record, mask) -> one eval example: the whole image resized to `out_size`, plus
  image_id, orig_size and mask (padding examples are zeros with mask False); with a
  `mask_stride`, masks at `out_size // mask_stride`."""
  with_masks = mask_stride is not None
  if with_masks:
    hm, wm = mask_size(out_size, mask_stride)

  def real(record):
    record = load(record)
    size = T.image_size(record["image"], record["size"])
    boxes, labels, invalid, masks, empty_masks = _objects(record, size, with_masks)
    image = T.eval_image(T.decode_window(record["image"], T.full_window(size)), out_size)
    scale = tf.cast(out_size, tf.float32) / tf.cast(size, tf.float32)
    boxes = boxes * tf.stack([scale[1], scale[0], scale[1], scale[0]])
    if with_masks:
      full = (0, 0, *out_size)
      masks = _resample_part(masks, out_size, mask_stride, full, full)
    out = _finish(image, boxes, labels, out_size, max_boxes, masks)
    out.update(image_id=record["image_id"], orig_size=size, _invalid_boxes=invalid)
    if with_masks:
      out["_invalid_masks"] = empty_masks
    return out

  def padding():
    out = dict(
      image=tf.zeros([*out_size, 3], tf.float32),
      boxes=tf.zeros([max_boxes, 4], tf.float32),
      labels=tf.zeros([max_boxes], tf.int32),
      valid=tf.zeros([max_boxes], tf.bool),
      _truncated_boxes=tf.constant(0, tf.int32),
      image_id=tf.constant(0, tf.int64),
      orig_size=tf.zeros([2], tf.int32),
      _invalid_boxes=tf.constant(0, tf.int32),
    )
    if with_masks:
      out.update(masks=tf.zeros([max_boxes, hm, wm], tf.uint8), _invalid_masks=tf.constant(0))
    return out

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


def _mask_stride(data_config):
  """`data.mask_stride` when `data.masks` is on, else None (no masks)."""
  return data_config.mask_stride if data_config.masks else None


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
  fn = make_train_example_fn(
    source.loader("train"), aug, out_size, data_config.max_boxes, seed, _mask_stride(data_config)
  )
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
  fn = make_eval_example_fn(
    source.loader("eval"), out_size, data_config.max_boxes, _mask_stride(data_config)
  )
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
    invalid_masks (with `data.masks`): non-crowd objects with a valid box and a mask without
      pixels, dropped (TFDS panoptic data, and folders read without `verify_images`).
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
    if "_invalid_masks" in batch:
      self._count_empty_masks(int(batch.pop("_invalid_masks").sum()))
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

  def _count_empty_masks(self, empty):
    if empty and not self.counters["invalid_masks"]:
      logging.warning(
        "%s: dropping objects whose mask has no pixel (a segment id missing from its panoptic "
        "PNG; counted in .counters['invalid_masks']).",
        self._name,
      )
    self.counters["invalid_masks"] += empty


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
