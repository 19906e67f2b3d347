"""Data sources: where examples come from, as tf.data records in one common format.

A record is a dict of tensors:
  image: tf.string, the encoded image.
  size: int32 `[2]` (height, width), or (-1, -1) when only decoding can tell.
  boxes: float32 `[n, 4]` xyxy normalized to [0, 1] by the image size.
  labels: int32 `[n]`, the model's labels.
  crowd: bool `[n]`, crowd (COCO iscrowd) or difficult (VOC) objects: never training targets.
  image_id: int64 scalar, the image's id in `coco_gt()`.
  masks: uint8 `[n, h, w]`, only with `data.masks`: object k's pixels at the image's size
    (`input_pipeline.masks`; crowd objects may have empty masks, they are never targets).

Two kinds of sources:
  * `TableSource` (COCO-format folders, the synthetic dataset) holds every annotation in
    memory and reads any image by index, so its training order is an exact per-epoch
    permutation (`tf.random.experimental.index_shuffle`) of the whole split, shared by all
    hosts: step s reads global positions s*B .. s*B+B-1, host p the slice p*b .. p*b+b-1.
    Starting at step k costs nothing. Its records are `{'index': i}` until `load()` reads
    them, so mosaic partners that are not used are never read.
  * `TfdsSource` (coco/2017, voc) reads its host's contiguous part of the split
    (`tfds.even_splits`, as `tfds.split_for_jax_process` does) sequentially; each epoch is
    shuffled with a buffer seeded from (seed, stream, host, epoch). Starting at step k
    skips whole epochs for free and reads (without decoding) up to one epoch of records.
"""

import dataclasses
import logging
import math

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import coco_format, masks, panoptic_format, synthetic, transforms

# COCO 2017's 80 category ids (TFDS label i is COCO_CATEGORY_IDS[i]) and names.
COCO_CATEGORY_IDS = tuple(
  i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# The 53 stuff categories of COCO panoptic 2017 (panopticapi's panoptic_coco_categories.json;
# its 80 things are COCO_CATEGORY_IDS / COCO_NAMES). TFDS coco/2017_panoptic's label i is the
# i-th of the 133 in category-id order.
COCO_PANOPTIC_STUFF = (
    (92, "banner"), (93, "blanket"), (95, "bridge"), (100, "cardboard"), (107, "counter"),
    (109, "curtain"), (112, "door-stuff"), (118, "floor-wood"), (119, "flower"),
    (122, "fruit"), (125, "gravel"), (128, "house"), (130, "light"), (133, "mirror-stuff"),
    (138, "net"), (141, "pillow"), (144, "platform"), (145, "playingfield"),
    (147, "railroad"), (148, "river"), (149, "road"), (151, "roof"), (154, "sand"),
    (155, "sea"), (156, "shelf"), (159, "snow"), (161, "stairs"), (166, "tent"),
    (168, "towel"), (171, "wall-brick"), (175, "wall-stone"), (176, "wall-tile"),
    (177, "wall-wood"), (178, "water-other"), (180, "window-blind"), (181, "window-other"),
    (184, "tree-merged"), (185, "fence-merged"), (186, "ceiling-merged"),
    (187, "sky-other-merged"), (188, "cabinet-merged"), (189, "table-merged"),
    (190, "floor-other-merged"), (191, "pavement-merged"), (192, "mountain-merged"),
    (193, "grass-merged"), (194, "dirt-merged"), (195, "paper-merged"),
    (196, "food-other-merged"), (197, "building-other-merged"), (198, "rock-merged"),
    (199, "wall-other-merged"), (200, "rug-merged"),
)  # fmt: skip
# The reference's num_classes for COCO panoptic: category ids are the labels.
PANOPTIC_NUM_CLASSES = 250
VOC_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

_UNUSED = "N/A"  # the class name of a COCO category id that COCO 2017 does not use
_NO_SIZE = (-1, -1)
_FOREVER = 2**62


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """The model's classes: labels 0..num_classes-1, the COCO category id of each, and whether
  it is a "thing" (countable objects) or "stuff" (amorphous regions, panoptic data only)."""

  num_classes: int
  label_to_category_id: np.ndarray  # int64 [num_classes]
  class_names: list
  is_thing: np.ndarray  # bool [num_classes]; detection data: all True; "N/A": False

  def coco_categories(self):
    """(category id, name) of the classes that exist ("N/A" placeholders are left out)."""
    return [
      (int(c), n) for c, n in zip(self.label_to_category_id, self.class_names) if n != _UNUSED
    ]

  def panoptic_categories(self):
    """COCO panoptic `categories` entries {id, name, isthing} of the classes that exist."""
    return [
      dict(id=int(c), name=n, isthing=int(t))
      for c, n, t in zip(self.label_to_category_id, self.class_names, self.is_thing)
      if n != _UNUSED
    ]


def _things(num_classes, ids, names):
  """A `LabelSpace` of detection classes (every class a thing)."""
  return LabelSpace(num_classes, np.asarray(ids, np.int64), list(names), np.ones(num_classes, bool))


def panoptic_label_space(categories, ids_as_labels):
  """The `LabelSpace` of panoptic categories.

  Args:
    categories: (id, name, isthing) of every category.
    ids_as_labels: True: label = category id, `max(PANOPTIC_NUM_CLASSES, max id + 1)`
      classes ("N/A", not a thing, for unused ids), as the reference's panoptic DETR; False:
      labels 0..K-1 in sorted id order.
  """
  categories = sorted((int(c), str(n), bool(t)) for c, n, t in categories)
  if not ids_as_labels:
    ids, names, things = zip(*categories)
    return LabelSpace(len(ids), np.asarray(ids, np.int64), list(names), np.asarray(things))
  k = max(PANOPTIC_NUM_CLASSES, categories[-1][0] + 1)
  names, things = [_UNUSED] * k, np.zeros(k, bool)
  for cid, name, thing in categories:
    names[cid], things[cid] = name, thing
  return LabelSpace(k, np.arange(k, dtype=np.int64), names, things)


def coco_panoptic_categories():
  """(id, name, isthing) of the 133 COCO panoptic 2017 categories, in id order."""
  things = [(c, n, True) for c, n in zip(COCO_CATEGORY_IDS, COCO_NAMES)]
  return things + [(c, n, False) for c, n in COCO_PANOPTIC_STUFF]


def label_space(cfg):
  """The `LabelSpace` of `config.data` without reading images or TFDS data.

  synthetic: labels 0..K-1 are the first K shapes, category ids 1..K. coco_folder: the
  categories of the train json (else the eval json), in sorted id order. coco_panoptic_folder:
  the categories (with `isthing`) of the train json (else the eval json), see
  `panoptic_label_space`. coco, voc, coco_panoptic: fixed by the dataset (`tfds_format`), so
  predicting with imported COCO weights needs no COCO download.
  """
  if cfg.name == "synthetic":
    k = cfg.synthetic_num_classes
    if not 1 <= k <= len(synthetic.SHAPES):
      raise ValueError(
        f"data.synthetic_num_classes must be in 1..{len(synthetic.SHAPES)}, got {k}."
      )
    return _things(k, np.arange(1, k + 1), synthetic.SHAPES[:k])
  if cfg.name == "coco_folder":
    if not cfg.train_annotations and not cfg.eval_annotations:
      raise ValueError("coco_folder needs data.train_annotations and/or data.eval_annotations.")
    ids, names = coco_format.read_categories(cfg.train_annotations or cfg.eval_annotations)
    return _things(len(ids), ids, names)
  if cfg.name == "coco_panoptic_folder":
    if not cfg.train_annotations and not cfg.eval_annotations:
      raise ValueError(
        "coco_panoptic_folder needs data.train_annotations and/or data.eval_annotations."
      )
    path = cfg.train_annotations or cfg.eval_annotations
    categories = panoptic_format.read_categories(path)
    return panoptic_label_space(categories, cfg.coco_category_ids_as_labels)
  if cfg.name in TFDS_SOURCES:
    return tfds_format(cfg).labels
  raise ValueError(f"Unknown data.name {cfg.name!r}: {' | '.join(SOURCES)}.")


# ---------------------------------------------------------------------------------------------
# What the TFDS sources read.
# ---------------------------------------------------------------------------------------------
TFDS_SOURCES = ("coco", "voc", "coco_panoptic")
SOURCES = ("synthetic", "coco_folder", "coco_panoptic_folder", *TFDS_SOURCES)


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
  """A TFDS split a config reads, and the config field it comes from (for messages)."""

  name: str  # TFDS name with config, e.g. 'coco/2017'
  split: str  # TFDS split expression, e.g. 'train+validation'
  field: str  # e.g. 'data.voc_train_splits'


def tfds_splits(cfg):
  """(train `TfdsSplit`s, the eval `TfdsSplit`) of a coco, coco_panoptic or voc config."""
  if cfg.name in ("coco", "coco_panoptic"):
    name = "coco/2017" if cfg.name == "coco" else "coco/2017_panoptic"
    train = [TfdsSplit(name, cfg.coco_train_split, "data.coco_train_split")]
    return train, TfdsSplit(name, cfg.coco_eval_split, "data.coco_eval_split")
  train = [_parse_tfds_split(s, "data.voc_train_splits") for s in cfg.voc_train_splits]
  return train, _parse_tfds_split(cfg.voc_eval_split, "data.voc_eval_split")


def _parse_tfds_split(spec, field):
  name, sep, split = spec.partition(":")
  if not sep or not name or not split:
    raise ValueError(f"{field}: expected a TFDS 'name:split' string, got {spec!r}.")
  return TfdsSplit(name, split, field)


def tfds_data_dir(cfg):
  """The TFDS data_dir of `config.data` (None: TFDS's default, $TFDS_DATA_DIR or
  ~/tensorflow_datasets)."""
  return cfg.data_dir or None  # "" in configs; None in configs saved by older versions


@dataclasses.dataclass(frozen=True)
class TfdsFormat:
  """How the features of one TFDS detection dataset become records; chosen once per source.

  Attributes:
    labels: the model's `LabelSpace`.
    label_map: int32 `[num TFDS labels]`, the model label of each TFDS label; None: the same.
    crowd_feature: per-object bool feature (under `objects_feature`) of objects that are
      never training targets and stay in the ground truth as `iscrowd` regions.
    image_id: fn(example) -> int64 scalar tensor, the image's id in `coco_gt`.
    has_ids_and_areas: whether objects carry COCO's annotation 'id' and 'area'.
    objects_feature: the per-object sequence feature ('objects'; coco/2017_panoptic:
      'panoptic_objects', whose 'id' is the segment id in 'panoptic_image').
    panoptic: whether examples have a 'panoptic_image' (the PNG of segment ids).
  """

  labels: LabelSpace
  label_map: object
  crowd_feature: str
  image_id: object
  has_ids_and_areas: bool
  objects_feature: str
  panoptic: bool


def _coco_image_id(example):
  return example["image/id"]


def _file_name_image_id(example):
  """VOC has file names only; a 53-bit hash keeps ids exact in JSON."""
  return tf.strings.to_hash_bucket_fast(example["image/filename"], 2**53)


_COCO_OBJECTS = dict(has_ids_and_areas=True, objects_feature="objects", panoptic=False)
_PANOPTIC_OBJECTS = dict(has_ids_and_areas=True, objects_feature="panoptic_objects", panoptic=True)
_VOC_OBJECTS = dict(has_ids_and_areas=False, objects_feature="objects", panoptic=False)


def tfds_format(cfg):
  """The `TfdsFormat` of a coco, coco_panoptic or voc config."""
  if cfg.name == "coco":
    if cfg.coco_category_ids_as_labels:
      names = [_UNUSED] * 91
      for cid, name in zip(COCO_CATEGORY_IDS, COCO_NAMES):
        names[cid] = name
      labels = LabelSpace(
        91, np.arange(91, dtype=np.int64), names, np.asarray([n != _UNUSED for n in names])
      )
      label_map = COCO_CATEGORY_IDS
    else:
      labels = _things(80, COCO_CATEGORY_IDS, COCO_NAMES)
      label_map = None
    return TfdsFormat(labels, label_map, "is_crowd", _coco_image_id, **_COCO_OBJECTS)
  if cfg.name == "coco_panoptic":
    categories = coco_panoptic_categories()
    labels = panoptic_label_space(categories, cfg.coco_category_ids_as_labels)
    label_map = [c for c, _, _ in categories] if cfg.coco_category_ids_as_labels else None
    return TfdsFormat(labels, label_map, "is_crowd", _coco_image_id, **_PANOPTIC_OBJECTS)
  if cfg.name == "voc":
    labels = _things(20, np.arange(1, 21), VOC_NAMES)
    return TfdsFormat(labels, None, "is_difficult", _file_name_image_id, **_VOC_OBJECTS)
  raise ValueError(f"data.name {cfg.name!r} is not a TFDS source ({' | '.join(TFDS_SOURCES)}).")


def _empty_record(with_masks):
  """A record of the common format with no image and no objects (padding); `with_masks`: in
  the form of TFDS records that carry masks (the PNG and the segment ids, see
  `TfdsSource.loader`)."""
  record = dict(
    image=tf.constant(b""),
    size=tf.constant(_NO_SIZE, tf.int32),
    boxes=tf.zeros([0, 4], tf.float32),
    labels=tf.zeros([0], tf.int32),
    crowd=tf.zeros([0], tf.bool),
    image_id=tf.constant(0, tf.int64),
  )
  if with_masks:
    record.update(panoptic=tf.constant(b""), segment_ids=tf.zeros([0], tf.int32))
  return record


def eval_slots(num_examples, process_count, local_batch):
  """Examples per host in the eval pass (the same on every host, a multiple of the batch)."""
  per_host = math.ceil(num_examples / process_count)
  return max(1, math.ceil(per_host / local_batch)) * local_batch


# ---------------------------------------------------------------------------------------------
# In-memory tables: COCO-format folders and the synthetic dataset.
# ---------------------------------------------------------------------------------------------
class TableSource:
  """Random-access source over two `coco_format.ExampleTable`s (train, eval).

  `mask_source` says where records' `masks` come from: None (no masks), "rle" (the tables'
  `rles`, decoded in NumPy) or "panoptic" (the tables' panoptic PNGs and `segment_ids`).
  """

  def __init__(self, train, eval_, labels, coco_gt, counters, *, mask_source, panoptic_gt):
    self.labels = labels
    self.counters = counters
    self._tables = dict(train=train, eval=eval_)
    self._tensors = {}
    self._coco_gt = coco_gt
    self._mask_source = mask_source
    self._panoptic_gt = panoptic_gt

  @property
  def num_train_examples(self):
    return self._tables["train"].num_images

  @property
  def num_eval_examples(self):
    return self._tables["eval"].num_images

  def coco_gt(self):
    return self._coco_gt

  def panoptic_gt(self):
    return self._panoptic_gt

  def _table_tensors(self, split):
    if split not in self._tensors:
      t = self._tables[split]
      self._tensors[split] = dict(
        paths=tf.constant([str(p) for p in t.image_paths], tf.string, shape=[t.num_images]),
        inline=tf.constant(list(t.image_bytes), tf.string, shape=[t.num_images]),
        sizes=tf.constant(t.sizes, tf.int32),
        image_ids=tf.constant(t.image_ids, tf.int64),
        row_splits=tf.constant(t.row_splits, tf.int64),
        boxes=tf.constant(t.boxes, tf.float32),
        labels=tf.constant(t.labels, tf.int32),
        crowd=tf.constant(t.crowd, tf.bool),
      )
      if self._mask_source == "rle":
        self._tensors[split]["decode_masks"] = masks.RleDecoder(t.rles, t.row_splits, t.sizes)
      if self._mask_source == "panoptic":
        self._tensors[split].update(
          panoptic_paths=tf.constant(
            [str(p) for p in t.panoptic_paths], tf.string, shape=[t.num_images]
          ),
          panoptic_inline=tf.constant(list(t.panoptic_bytes), tf.string, shape=[t.num_images]),
          segment_ids=tf.constant(t.segment_ids, tf.int32),
        )
    return self._tensors[split]

  def loader(self, split):
    """A function lazy record `{'index': i}` -> full record of `split` (reads the image)."""
    t = self._table_tensors(split)
    return lambda record: self._load(t, record["index"])

  def _load(self, t, i):
    start, end = t["row_splits"][i], t["row_splits"][i + 1]
    image = _read_or_inline(t["paths"][i], t["inline"][i])
    record = dict(
      image=image,
      size=t["sizes"][i],
      boxes=t["boxes"][start:end],
      labels=t["labels"][start:end],
      crowd=t["crowd"][start:end],
      image_id=t["image_ids"][i],
    )
    if self._mask_source == "rle":
      record["masks"] = t["decode_masks"].tf_decode(i)
    elif self._mask_source == "panoptic":
      png = _read_or_inline(t["panoptic_paths"][i], t["panoptic_inline"][i])
      record["masks"] = masks.segment_masks(png, t["segment_ids"][start:end])
    return record

  def train_records(self, *, start, seed, stream, process_index, local_batch, global_batch, **_):
    """Endless (key position, lazy record) pairs of this host from local position `start`.

    The key position is the example's global position in the run (unique over hosts); the
    record of stream `stream` at global position g is image
    `index_shuffle(g % n, seed=(seed, stream, g // n))`: stream 0 is the epoch order, streams
    1..3 are independent orders that supply mosaic partners.
    """
    n = self.num_train_examples
    if n == 0:
      raise ValueError("The training split has no usable images.")
    b, big_b, p = local_batch, global_batch, process_index
    base = tf.constant([seed, stream], tf.int64)

    def lookup(k):
      g = (k // b) * big_b + p * b + k % b
      epoch_seed = tf.random.experimental.stateless_fold_in(base, g // n)
      i = tf.random.experimental.index_shuffle(g % n, epoch_seed, tf.constant(n - 1, tf.int64))
      return g, dict(index=i)

    return tf.data.Dataset.range(start, _FOREVER).map(transforms.no_autograph(lookup))

  def eval_records(self, *, process_index, process_count, local_batch):
    """(lazy record, mask) of this host: images p, p + P, ... then padding (mask False)."""
    n = self.num_eval_examples
    slots = eval_slots(n, process_count, local_batch)
    mine = np.arange(process_index, n, process_count)
    indices = np.concatenate([mine, -np.ones(slots - len(mine), np.int64)]).astype(np.int64)
    return tf.data.Dataset.from_tensor_slices(indices).map(
      lambda i: (dict(index=tf.maximum(i, 0)), i >= 0)
    )


def _read_or_inline(path, inline):
  """The file `path` when it is not empty, else the bytes `inline` (tf.string scalars)."""
  return tf.cond(tf.strings.length(path) > 0, lambda: tf.io.read_file(path), lambda: inline)


def folder_source(cfg):
  """A `TableSource` for `cfg.name == 'coco_folder'`."""
  labels = label_space(cfg)
  category_ids = [int(c) for c in labels.label_to_category_id]
  counters = {}
  tables, gts = {}, {}
  for split, ann, images in (
    ("train", cfg.train_annotations, cfg.train_images),
    ("eval", cfg.eval_annotations, cfg.eval_images),
  ):
    if not ann:
      tables[split], gts[split] = coco_format.build_table([]), None
      continue
    table, gt, c = coco_format.load_coco_folder(
      ann,
      images,
      category_ids=category_ids,
      verify_images=cfg.verify_images,
      masks=cfg.masks,
      split=split,
    )
    tables[split], gts[split] = table, gt
    counters.update(c)
  gt = gts["eval"] or coco_format.gt_json([], [], labels.coco_categories())
  return TableSource(
    tables["train"],
    tables["eval"],
    labels,
    gt,
    counters,
    mask_source="rle" if cfg.masks else None,
    panoptic_gt=None,
  )


def panoptic_folder_source(cfg):
  """A `TableSource` for `cfg.name == 'coco_panoptic_folder'`."""
  labels = label_space(cfg)
  label_of = {
    int(c): k
    for k, (c, n) in enumerate(zip(labels.label_to_category_id, labels.class_names))
    if n != _UNUSED
  }
  counters = {}
  tables, gts, panoptic_gts = {}, {}, {}
  for split, ann, images, pngs in (
    ("train", cfg.train_annotations, cfg.train_images, cfg.train_panoptic_pngs),
    ("eval", cfg.eval_annotations, cfg.eval_images, cfg.eval_panoptic_pngs),
  ):
    if not ann:
      tables[split], gts[split], panoptic_gts[split] = coco_format.build_table([]), None, None
      continue
    if not pngs:
      raise ValueError(
        f"coco_panoptic_folder: data.{split}_annotations is set but data.{split}_panoptic_pngs "
        "(the folder of its PNGs) is empty."
      )
    table, gt, panoptic_gt, c = panoptic_format.load_panoptic_folder(
      ann, images, pngs, label_of=label_of, verify_images=cfg.verify_images, split=split
    )
    tables[split], gts[split], panoptic_gts[split] = table, gt, panoptic_gt
    counters.update(c)
  gt = gts["eval"] or coco_format.gt_json([], [], labels.coco_categories())
  return TableSource(
    tables["train"],
    tables["eval"],
    labels,
    gt,
    counters,
    mask_source="panoptic" if cfg.masks else None,
    panoptic_gt=panoptic_gts["eval"],
  )


def synthetic_source(cfg):
  """A `TableSource` of the procedural dataset (`input_pipeline.synthetic`).

  Every object is a thing; its mask is its visible part, segment id k + 1 of the image's
  panoptic PNG (`synthetic.generate`). With `cfg.masks` the eval split's `coco_gt` has each
  object's `segmentation` (RLE); the panoptic ground truth is always there.
  """
  labels = label_space(cfg)
  h, w = cfg.synthetic_image_size
  tables = {}
  gt_images, gt_annotations = [], []
  panoptic_annotations, pngs = [], {}
  for split in ("train", "eval"):
    examples = synthetic.generate_split(cfg, split)
    rows = []
    for i, ex in enumerate(examples):
      image_id = i + 1
      n = len(ex["labels"])
      rows.append(
        dict(
          path="",
          data=ex["jpeg"],
          height=h,
          width=w,
          image_id=image_id,
          boxes=ex["boxes"] / np.asarray([w, h, w, h], np.float32),
          labels=ex["labels"],
          crowd=np.zeros(n, bool),
          panoptic_data=ex["segments_png"] if cfg.masks else b"",
          segment_ids=np.arange(1, n + 1),
        )
      )
      if split == "eval":
        gt_images.append(coco_format.gt_image(image_id, w, h, f"{image_id}.jpg"))
        ids = panoptic_format.read_panoptic_png(ex["segments_png"]) if cfg.masks else None
        segments = []
        for k, (box, label, area) in enumerate(zip(ex["boxes"], ex["labels"], ex["areas"])):
          category_id = labels.label_to_category_id[label]
          ann_id = len(gt_annotations) + 1
          segmentation = None
          if cfg.masks:
            segmentation = masks.rle_json(masks.encode(ids == k + 1), h, w)
          gt_annotations.append(
            coco_format.gt_annotation(
              ann_id, image_id, category_id, box, area=area, segmentation=segmentation
            )
          )
          x0, y0, x1, y1 = (float(v) for v in box)
          segments.append(
            dict(
              id=k + 1,
              category_id=int(category_id),
              iscrowd=0,
              area=int(area),
              bbox=[x0, y0, x1 - x0, y1 - y0],
            )
          )
        pngs[image_id] = ex["segments_png"]
        panoptic_annotations.append(
          dict(image_id=image_id, file_name=f"{image_id}.png", segments_info=segments)
        )
    tables[split] = coco_format.build_table(rows)
  gt = coco_format.gt_json(gt_images, gt_annotations, labels.coco_categories())
  panoptic_json = dict(
    images=gt_images, annotations=panoptic_annotations, categories=labels.panoptic_categories()
  )
  return TableSource(
    tables["train"],
    tables["eval"],
    labels,
    gt,
    counters={},
    mask_source="panoptic" if cfg.masks else None,
    panoptic_gt=panoptic_format.memory_ground_truth(panoptic_json, pngs),
  )


# ---------------------------------------------------------------------------------------------
# TFDS: coco/2017 and voc.
# ---------------------------------------------------------------------------------------------
class TfdsSource:
  """Sequential source over TFDS splits (images read undecoded, decoded by the pipeline)."""

  def __init__(self, fmt, train_splits, eval_split, *, data_dir, shuffle_buffer, with_masks):
    """
    Args:
      fmt: `TfdsFormat`, how the dataset's features map to records.
      train_splits: list of `TfdsSplit`; several are read as their union.
      eval_split: `TfdsSplit`.
      data_dir: TFDS data_dir or None (TFDS's default).
      shuffle_buffer: per-epoch shuffle buffer of the training stream.
      with_masks: records carry masks (panoptic datasets only).
    """
    if with_masks and not fmt.panoptic:
      raise ValueError(
        f"data.masks=True: TFDS {eval_split.name} has no instance masks; use "
        "data.name=coco_panoptic (TFDS coco/2017_panoptic), or coco_folder with a COCO "
        "instances json."
      )
    self._fmt = fmt
    self._with_masks = with_masks
    self.labels = fmt.labels
    self._label_map = None if fmt.label_map is None else tf.constant(fmt.label_map, tf.int32)
    self._data_dir = data_dir
    self._train = list(train_splits)
    self._eval = eval_split
    self._shuffle_buffer = shuffle_buffer
    self.counters = {}
    self._gt = None
    self._panoptic_gt = None
    self._num = {}

  def _as_dataset(self, name, split):
    """The TFDS split with its images (and panoptic PNGs) left encoded."""
    decoders = {"image": tfds.decode.SkipDecoding()}
    if self._fmt.panoptic:
      decoders["panoptic_image"] = tfds.decode.SkipDecoding()
    builder = tfds.builder(name, data_dir=self._data_dir)
    return builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)

  def _read(self, name, split):
    ds = self._as_dataset(name, split)
    return ds.map(transforms.no_autograph(self._to_record), num_parallel_calls=tf.data.AUTOTUNE)

  def _to_record(self, ex):
    """A record; with masks it holds the PNG (`panoptic`) and the objects' `segment_ids`
    instead of `masks`, which `loader` computes (records wait in shuffle buffers)."""
    objects = ex[self._fmt.objects_feature]
    crowd = self._fmt.crowd_feature
    # Real TFDS data has per-object features of equal length; TFDS's random mock data does
    # not, so they are cut to the shortest.
    features = ["bbox", "label", crowd] + (["id"] if self._with_masks else [])
    n = tf.reduce_min([tf.shape(objects[f])[0] for f in features])
    bbox = objects["bbox"][:n]  # ymin, xmin, ymax, xmax
    labels = tf.cast(objects["label"][:n], tf.int32)
    if self._label_map is not None:
      labels = tf.gather(self._label_map, labels)
    record = dict(
      image=ex["image"],
      size=tf.constant(_NO_SIZE, tf.int32),
      boxes=tf.stack([bbox[:, 1], bbox[:, 0], bbox[:, 3], bbox[:, 2]], axis=1),
      labels=labels,
      crowd=tf.cast(objects[crowd][:n], tf.bool),
      image_id=self._fmt.image_id(ex),
    )
    if self._with_masks:
      record.update(panoptic=ex["panoptic_image"], segment_ids=tf.cast(objects["id"][:n], tf.int32))
    return record

  def _cardinality(self, ds, what):
    n = int(ds.cardinality().numpy())
    if n < 0:
      raise ValueError(f"TFDS {what}: unknown number of examples.")
    return n

  def _count(self, s):
    if (s.name, s.split) not in self._num:
      ds = self._read(s.name, s.split)
      self._num[s.name, s.split] = self._cardinality(ds, f"{s.name}:{s.split}")
    return self._num[s.name, s.split]

  @property
  def num_train_examples(self):
    return sum(self._count(s) for s in self._train)

  @property
  def num_eval_examples(self):
    return self._count(self._eval)

  def loader(self, split):
    """Records are complete already (the identity), but for their masks: those are decoded
    here from the PNG, once the record leaves the shuffle buffer."""
    del split
    if not self._with_masks:
      return lambda record: record

    def load(record):
      record = dict(record)
      png, segment_ids = record.pop("panoptic"), record.pop("segment_ids")
      record["masks"] = masks.segment_masks(png, segment_ids)
      return record

    return load

  def _host_split(self, split, process_index, process_count):
    if process_count == 1:
      return split
    return tfds.even_splits(split, n=process_count)[process_index]

  def train_records(self, *, start, seed, stream, process_index, process_count, **_):
    """Endless (key position, record) pairs of this host's shard from local position `start`.

    Key positions are `local position * process_count + process_index` (unique over hosts).
    """
    base = None
    for s in self._train:
      ds = self._read(s.name, self._host_split(s.split, process_index, process_count))
      base = ds if base is None else base.concatenate(ds)
    n = self._cardinality(base, f"train shard {process_index}")
    if n == 0:
      raise ValueError(f"TFDS train shard {process_index}/{process_count} has no examples.")
    first_epoch, offset = divmod(start, n)
    seed0 = int(np.random.SeedSequence([seed, stream, process_index]).generate_state(1)[0])
    buffer = self._shuffle_buffer

    def epoch(e):
      return base.shuffle(buffer, seed=seed0 + e * 1_000_003, reshuffle_each_iteration=False)

    records = tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(transforms.no_autograph(epoch))
    records = records.skip(offset)
    keys = tf.data.Dataset.range(start, _FOREVER).map(
      transforms.no_autograph(lambda k: k * process_count + process_index)
    )
    return tf.data.Dataset.zip(keys, records)

  def eval_records(self, *, process_index, process_count, local_batch):
    """(record, mask) of this host's contiguous part of the eval split, then padding."""
    total = self.num_eval_examples
    slots = eval_slots(total, process_count, local_batch)
    split = self._host_split(self._eval.split, process_index, process_count)
    ds = self._read(self._eval.name, split)
    n = self._cardinality(ds, f"eval shard {process_index}")
    if n > slots:
      raise ValueError(f"TFDS eval shard {process_index} has {n} > {slots} examples.")
    ds = ds.map(transforms.no_autograph(lambda r: (r, tf.constant(True))))
    pad = tf.data.Dataset.from_tensors((_empty_record(self._with_masks), tf.constant(False)))
    pad = pad.repeat(slots - n)
    return ds.concatenate(pad)

  def coco_gt(self):
    """COCO json of the eval split (one pass over it, image sizes from the JPEG headers)."""
    if self._gt is None:
      self._build_gt()
    return self._gt

  def panoptic_gt(self):
    """coco/2017_panoptic: the eval split's `panoptic_format.PanopticGroundTruth` (its PNGs
    held in memory, built in the same pass as `coco_gt`); other datasets: None."""
    if not self._fmt.panoptic:
      return None
    if self._panoptic_gt is None:
      self._build_gt()
    return self._panoptic_gt

  def _gt_fields(self, ex):
    """An eval example's record (without the image) plus its size, annotation ids and areas
    (-1 where the dataset has none); panoptic datasets: also the PNG and segment ids."""
    rec = self._to_record(ex)
    rec.pop("panoptic", None)
    rec.pop("segment_ids", None)
    objects = ex[self._fmt.objects_feature]
    n = tf.shape(rec["labels"])[0]
    if self._fmt.panoptic:
      # Segment ids are unique per image only: the json gets fresh annotation ids.
      rec.update(panoptic=ex["panoptic_image"], segment_ids=objects["id"][:n])
    if self._fmt.has_ids_and_areas and not self._fmt.panoptic:
      ann_ids = objects["id"][:n]
    else:
      ann_ids = tf.fill([n], tf.constant(-1, tf.int64))
    if self._fmt.has_ids_and_areas:
      areas = tf.cast(objects["area"][:n], tf.float32)
    else:
      areas = tf.fill([n], -1.0)
    size = transforms.image_size(rec.pop("image"), rec["size"])
    return dict(rec, size=size, ann_ids=ann_ids, areas=areas)

  def _build_gt(self):
    raw = self._as_dataset(self._eval.name, self._eval.split)
    fields = raw.map(transforms.no_autograph(self._gt_fields), num_parallel_calls=tf.data.AUTOTUNE)
    images, annotations = [], []
    panoptic_annotations, pngs = [], {}
    seen = set()
    to_cat = self.labels.label_to_category_id
    for r in fields.as_numpy_iterator():
      iid = int(r["image_id"])
      if iid in seen:
        logging.warning(
          "TFDS %s:%s: image id %d appears twice; keeping the first.",
          self._eval.name,
          self._eval.split,
          iid,
        )
        continue
      seen.add(iid)
      h, w = (int(v) for v in r["size"])
      images.append(coco_format.gt_image(iid, w, h))
      if self._fmt.panoptic:
        pngs[iid] = r["panoptic"]
        panoptic_annotations.append(
          dict(
            image_id=iid,
            file_name=f"{iid:012d}.png",
            segments_info=_segments_info(r, to_cat, w, h),
          )
        )
      for box, label, crowd, aid, area in zip(
        r["boxes"], r["labels"], r["crowd"], r["ann_ids"], r["areas"]
      ):
        x0, y0, x1, y1 = (float(v) for v in np.clip(box, 0.0, 1.0) * [w, h, w, h])
        if not (np.all(np.isfinite(box)) and x1 > x0 and y1 > y0):
          self.counters["eval/invalid_boxes"] = self.counters.get("eval/invalid_boxes", 0) + 1
          continue
        annotations.append(
          coco_format.gt_annotation(
            int(aid) if aid >= 0 else len(annotations) + 1,
            iid,
            to_cat[label],
            (x0, y0, x1, y1),
            area=area if area > 0 else None,
            crowd=crowd,
          )
        )
    self._gt = coco_format.gt_json(images, annotations, self.labels.coco_categories())
    if self._fmt.panoptic:
      panoptic_json = dict(
        images=images,
        annotations=panoptic_annotations,
        categories=self.labels.panoptic_categories(),
      )
      self._panoptic_gt = panoptic_format.memory_ground_truth(panoptic_json, pngs)


def _segments_info(fields, to_cat, w, h):
  """The COCO panoptic `segments_info` of one TFDS coco/2017_panoptic example."""
  segments = []
  for sid, box, label, crowd, area in zip(
    fields["segment_ids"], fields["boxes"], fields["labels"], fields["crowd"], fields["areas"]
  ):
    x0, y0, x1, y1 = (float(v) for v in np.nan_to_num(box) * [w, h, w, h])
    segments.append(
      dict(
        id=int(sid),
        category_id=int(to_cat[label]),
        iscrowd=int(crowd),
        area=int(area),
        bbox=[x0, y0, x1 - x0, y1 - y0],
      )
    )
  return segments


def tfds_source(cfg):
  """A `TfdsSource` for `cfg.name` in `TFDS_SOURCES`."""
  train, eval_ = tfds_splits(cfg)
  return TfdsSource(
    tfds_format(cfg),
    train,
    eval_,
    data_dir=tfds_data_dir(cfg),
    shuffle_buffer=cfg.shuffle_buffer,
    with_masks=cfg.masks,
  )


def build_source(cfg):
  """The source named by `cfg.name` (one of `SOURCES`)."""
  if cfg.name == "synthetic":
    return synthetic_source(cfg)
  if cfg.name == "coco_folder":
    return folder_source(cfg)
  if cfg.name == "coco_panoptic_folder":
    return panoptic_folder_source(cfg)
  if cfg.name in TFDS_SOURCES:
    return tfds_source(cfg)
  raise ValueError(f"Unknown data.name {cfg.name!r}: {' | '.join(SOURCES)}.")
