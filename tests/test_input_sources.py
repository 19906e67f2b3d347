"""Tests of the input pipeline's sources: TFDS coco/2017 and voc under `tfds.testing.mock_data`,
COCO-format folders with every image mode and the documented handling of bad input, and the
label space and one-image functions that `predict.py` shares with the eval split."""

import io
import json
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from input_helpers import MEAN, STD
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

import input_pipeline
from configs import base
from input_pipeline import sources

pytestmark = pytest.mark.usefixtures("fresh_sources")


def data_config(**overrides):
  cfg = base.get_data_config()
  cfg.update(
    dict(
      max_boxes=5,
      shuffle_buffer=8,
      crop_resize_sizes=(48, 56),
      crop_min_size=32,
      crop_max_size=56,
    )
  )
  cfg.update(overrides)
  return cfg


def jpeg_bytes(h, w, boxes, seed):
  """A JPEG with filled rectangles at normalized (ymin, xmin, ymax, xmax) `boxes`."""
  image = Image.new("RGB", (w, h), (30, 30, 30))
  draw = ImageDraw.Draw(image)
  rng = np.random.default_rng(seed)
  for y0, x0, y1, x1 in boxes:
    color = tuple(int(v) for v in rng.integers(80, 255, 3))
    draw.rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], fill=color)
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def batches_of(cfg, **kw):
  return list(input_pipeline.create_eval_iterator(cfg, process_index=0, process_count=1, **kw))


def assert_same_labels(labels, info):
  """`input_pipeline.label_space` agrees with the source that read the data."""
  assert labels.num_classes == info.num_classes
  assert list(labels.class_names) == list(info.class_names)
  np.testing.assert_array_equal(labels.label_to_category_id, info.label_to_category_id)


# ---------------------------------------------------------------------------------------------
# TFDS coco/2017.
# ---------------------------------------------------------------------------------------------
# Per image: ymin, xmin, ymax, xmax boxes (the last one is invalid: ymax < ymin), TFDS labels
# 0..79, crowd flags.
COCO_BOXES = [[0.1, 0.1, 0.5, 0.6], [0.3, 0.4, 0.9, 0.95], [0.6, 0.2, 0.4, 0.5]]
COCO_LABELS = [0, 11, 79]  # COCO category ids 1, 13, 90
COCO_CROWD = [False, True, False]


def coco_examples(n, offset):
  for i in range(n):
    h, w = 40 + 4 * i, 64
    yield {
      "image": jpeg_bytes(h, w, COCO_BOXES[:2], i),
      "image/filename": f"{offset + i:012d}.jpg",
      "image/id": offset + i,
      "objects": {
        "area": np.asarray([100, 200, 300]),
        "bbox": np.asarray(COCO_BOXES, np.float32),
        "id": np.asarray([1, 2, 3]) + 10 * (offset + i),
        "is_crowd": np.asarray(COCO_CROWD),
        "label": np.asarray(COCO_LABELS),
      },
    }


def mock_coco(self, split, decoders=None, read_config=None, shuffle_files=False):
  """`as_dataset` of coco/2017: 6 train and 4 validation examples, images left encoded (the
  pipeline asks for `SkipDecoding`)."""
  del self, read_config, shuffle_files
  assert decoders is not None and "image" in decoders
  n, offset = (6, 100) if "train" in str(split) else (4, 500)
  spec = {
    "image": tf.TensorSpec([], tf.string),
    "image/filename": tf.TensorSpec([], tf.string),
    "image/id": tf.TensorSpec([], tf.int64),
    "objects": {
      "area": tf.TensorSpec([None], tf.int64),
      "bbox": tf.TensorSpec([None, 4], tf.float32),
      "id": tf.TensorSpec([None], tf.int64),
      "is_crowd": tf.TensorSpec([None], tf.bool),
      "label": tf.TensorSpec([None], tf.int64),
    },
  }
  ds = tf.data.Dataset.from_generator(lambda: coco_examples(n, offset), output_signature=spec)
  return ds.apply(tf.data.experimental.assert_cardinality(n))


def test_tfds_coco_labels_are_category_ids_and_gt_is_coco_format():
  cfg = data_config(name="coco", coco_category_ids_as_labels=True)
  with tfds.testing.mock_data(as_dataset_fn=mock_coco):
    info = input_pipeline.get_dataset_info(cfg)
    assert_same_labels(input_pipeline.label_space(cfg), info)
    assert info.num_classes == 91 and len(info.class_names) == 91
    np.testing.assert_array_equal(info.label_to_category_id, np.arange(91))
    assert info.class_names[1] == "person" and info.class_names[12] == "N/A"
    assert (info.num_train_examples, info.num_eval_examples) == (6, 4)
    gt = COCO()
    gt.dataset = info.coco_gt
    gt.createIndex()
    assert sorted(gt.getImgIds()) == [500, 501, 502, 503]
    assert len(gt.getCatIds()) == 80 and 90 in gt.getCatIds() and 12 not in gt.getCatIds()
    anns = gt.loadAnns(gt.getAnnIds(imgIds=501))
    # The invalid box is left out and counted; the crowd box stays as a crowd region.
    assert [(a["id"], a["category_id"], a["iscrowd"]) for a in anns] == [
      (5011, 1, 0),
      (5012, 13, 1),
    ]
    assert anns[0]["area"] == 100  # TFDS's area (COCO's segmentation area) is kept
    np.testing.assert_allclose(anns[0]["bbox"], [6.4, 4.4, 32.0, 17.6], rtol=1e-5)
    assert info.counters["eval/invalid_boxes"] == 4

    batches = batches_of(cfg, image_size=(32, 48), global_batch_size=3)
    assert len(batches) == 2
    ids = np.concatenate([b["image_id"][b["mask"]] for b in batches])
    assert sorted(ids.tolist()) == [500, 501, 502, 503]
    for b in batches:
      for i in np.flatnonzero(b["mask"]):
        assert b["orig_size"][i].tolist() == [40 + 4 * (b["image_id"][i] - 500), 64]
        assert b["labels"][i][b["valid"][i]].tolist() == [1]  # crowd and invalid left out
        np.testing.assert_allclose(b["boxes"][i][0], [0.35, 0.3, 0.5, 0.4], atol=1e-6)

    it = input_pipeline.create_train_iterator(
      cfg, image_size=(32, 48), global_batch_size=2, seed=0, process_index=0, process_count=1
    )
    labels = np.concatenate([next(it)["labels"] for _ in range(4)])
    assert set(labels.ravel().tolist()) <= {0, 1}  # only category 1 is a valid non-crowd box
    assert it.counters["invalid_boxes"] == 8 and it.counters["truncated_boxes"] == 0


def test_tfds_coco_contiguous_labels():
  cfg = data_config(name="coco", coco_category_ids_as_labels=False)
  with tfds.testing.mock_data(as_dataset_fn=mock_coco):
    info = input_pipeline.get_dataset_info(cfg)
    assert_same_labels(input_pipeline.label_space(cfg), info)
    assert info.num_classes == 80 and info.class_names[79] == "toothbrush"
    np.testing.assert_array_equal(info.label_to_category_id, sources.COCO_CATEGORY_IDS)
    assert info.label_to_category_id[11] == 13
    gt_cats = {a["category_id"] for a in info.coco_gt["annotations"]}
    assert gt_cats == {1, 13}
    b = batches_of(cfg, image_size=(32, 48), global_batch_size=4)[0]
    assert (b["labels"][b["valid"]] == 0).all()


def test_tfds_train_order_is_deterministic_and_resumable():
  cfg = data_config(name="coco", mosaic_prob=0.5)
  with tfds.testing.mock_data(as_dataset_fn=mock_coco):
    make = lambda start: input_pipeline.create_train_iterator(
      cfg, image_size=(32, 48), global_batch_size=2, seed=4, start_step=start,
      process_index=0, process_count=1,
    )  # fmt: skip
    full = [next(it) for it in [make(0)] for _ in range(5)]  # 3 steps per epoch
    again = [next(it) for it in [make(0)] for _ in range(5)]
    resumed = [next(it) for it in [make(2)] for _ in range(3)]
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  for a, b in zip(full[2:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


# ---------------------------------------------------------------------------------------------
# TFDS voc: the union of two training sets.
# ---------------------------------------------------------------------------------------------
def mock_voc(self, split, decoders=None, read_config=None, shuffle_files=False):
  """voc/2007 and voc/2012: 3 + 2 train examples, 3 test examples; object 2 is difficult."""
  del decoders, read_config, shuffle_files
  year = self.builder_config.name
  n = 3 if "test" in str(split) else {"2007": 3, "2012": 2}[year]
  boxes = np.asarray([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.8]], np.float32)

  def gen():
    for i in range(n):
      yield {
        "image": jpeg_bytes(48, 64, boxes, i),
        "image/filename": f"{year}_{split}_{i:06d}.jpg",
        "labels": np.asarray([14, 6]),
        "labels_no_difficult": np.asarray([14]),
        "objects": {
          "bbox": boxes,
          "is_difficult": np.asarray([False, True]),
          "is_truncated": np.asarray([False, False]),
          "label": np.asarray([14, 6]),
          "pose": np.asarray([0, 0]),
        },
      }

  spec = {
    "image": tf.TensorSpec([], tf.string),
    "image/filename": tf.TensorSpec([], tf.string),
    "labels": tf.TensorSpec([None], tf.int64),
    "labels_no_difficult": tf.TensorSpec([None], tf.int64),
    "objects": {
      "bbox": tf.TensorSpec([None, 4], tf.float32),
      "is_difficult": tf.TensorSpec([None], tf.bool),
      "is_truncated": tf.TensorSpec([None], tf.bool),
      "label": tf.TensorSpec([None], tf.int64),
      "pose": tf.TensorSpec([None], tf.int64),
    },
  }
  ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
  return ds.apply(tf.data.experimental.assert_cardinality(n))


def test_tfds_voc_union_and_difficult_objects():
  cfg = data_config(name="voc")
  with tfds.testing.mock_data(as_dataset_fn=mock_voc):
    info = input_pipeline.get_dataset_info(cfg)
    assert_same_labels(input_pipeline.label_space(cfg), info)
    assert info.num_classes == 20 and info.class_names[14] == "person"
    assert (info.num_train_examples, info.num_eval_examples) == (5, 3)
    np.testing.assert_array_equal(info.label_to_category_id, np.arange(1, 21))
    gt = info.coco_gt
    assert len({im["id"] for im in gt["images"]}) == 3
    assert (
      sorted((a["category_id"], a["iscrowd"]) for a in gt["annotations"])
      == [(7, 1)] * 3 + [(15, 0)] * 3
    )
    b = batches_of(cfg, image_size=(48, 64), global_batch_size=3)[0]
    assert sorted(b["image_id"].tolist()) == sorted(im["id"] for im in gt["images"])
    assert (b["valid"].sum(1) == 1).all() and (b["labels"][:, 0] == 14).all()
    it = input_pipeline.create_train_iterator(
      cfg, image_size=(48, 64), global_batch_size=5, seed=0, process_index=0, process_count=1
    )
    batch = next(it)
    assert (batch["labels"][batch["valid"]] == 14).all()  # difficult objects are not targets


# ---------------------------------------------------------------------------------------------
# COCO-format folders.
# ---------------------------------------------------------------------------------------------
SIZE = (48, 64)  # height, width of every test image


def drawn(mode):
  """An RGB drawing converted to `mode`, and the RGB that PIL reads back from it."""
  image = Image.new("RGB", SIZE[::-1], (20, 40, 60))
  draw = ImageDraw.Draw(image)
  draw.rectangle([8, 6, 29, 25], fill=(250, 40, 40))
  draw.rectangle([36, 20, 59, 43], fill=(40, 200, 90))
  return image.convert(mode)


def write_folder(root, annotations, images):
  """Writes images {file name: bytes or None (missing)} and annotations.json under root."""
  img_dir = root / "images"
  img_dir.mkdir(parents=True, exist_ok=True)
  entries = []
  for i, (name, data) in enumerate(images.items()):
    if data is not None:
      (img_dir / name).write_bytes(data)
    entries.append(dict(id=i + 1, file_name=name, width=SIZE[1], height=SIZE[0]))
  categories = [dict(id=3, name="red"), dict(id=7, name="green"), dict(id=9, name="unused")]
  path = root / "annotations.json"
  # NaN is written as the bare token NaN, which Python's json (like many tools) reads back.
  path.write_text(json.dumps(dict(images=entries, annotations=annotations, categories=categories)))
  return str(path), str(img_dir)


def encode(image, fmt, **kw):
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kw)
  return buf.getvalue()


GOOD = {
  "rgb.jpg": lambda: encode(drawn("RGB"), "JPEG", quality=98),
  "gray.png": lambda: encode(drawn("L"), "PNG"),
  "rgba.png": lambda: encode(drawn("RGBA"), "PNG"),
  "cmyk.jpg": lambda: encode(drawn("CMYK"), "JPEG", quality=98),
  "palette.gif": lambda: encode(drawn("RGB").convert("P", palette=Image.ADAPTIVE), "GIF"),
  "photo.tif": lambda: encode(drawn("RGB"), "TIFF"),
}


def good_annotations(image_ids):
  anns = []
  for iid in image_ids:
    anns.append(dict(id=10 * iid + 1, image_id=iid, category_id=3, bbox=[8, 6, 22, 20]))
    anns.append(dict(id=10 * iid + 2, image_id=iid, category_id=7, bbox=[36, 20, 24, 24]))
  return anns


@pytest.fixture
def messy_folder(tmp_path):
  jpeg = GOOD["rgb.jpg"]()
  images = {name: make() for name, make in GOOD.items()}
  images.update(
    {
      "empty.png": encode(drawn("RGB"), "PNG"),  # no annotations
      "corrupt.jpg": b"\xff\xd8 this is not an image",
      "truncated.jpg": jpeg[: len(jpeg) // 2],
      "missing.jpg": None,
      "not_an_image.png": b"hello",
    }
  )
  anns = good_annotations(range(1, len(GOOD) + 1))
  rgb = 1
  anns += [
    dict(id=101, image_id=rgb, category_id=3, bbox=[10, 10, -5, 8]),  # negative width
    dict(id=102, image_id=rgb, category_id=3, bbox=[10, 10, 5, 0]),  # zero height
    dict(id=103, image_id=rgb, category_id=3, bbox=[math.nan, 10, 5, 5]),  # NaN
    dict(id=104, image_id=rgb, category_id=7, bbox=[70, 10, 5, 5]),  # outside the image
    dict(id=105, image_id=rgb, category_id=7, bbox=[50, 40, 30, 30]),  # partly outside
    dict(id=106, image_id=rgb, category_id=3, bbox=[0, 30, 6, 10], iscrowd=1),
    dict(id=107, image_id=9, category_id=3, bbox=[1, 1, 5, 5]),  # on the corrupt image
  ]
  return write_folder(tmp_path, anns, images)


def folder_config(annotations, images, **overrides):
  return data_config(
    name="coco_folder",
    train_annotations=annotations,
    train_images=images,
    eval_annotations=annotations,
    eval_images=images,
    **overrides,
  )


def test_folder_bad_input_is_skipped_and_counted(messy_folder):
  cfg = folder_config(*messy_folder)
  info = input_pipeline.get_dataset_info(cfg)
  assert_same_labels(input_pipeline.label_space(cfg), info)
  assert info.num_classes == 3 and info.class_names == ["red", "green", "unused"]
  np.testing.assert_array_equal(info.label_to_category_id, [3, 7, 9])
  c = info.counters
  assert c["train/skipped_images"] == 4  # corrupt, truncated, missing, not an image
  assert c["train/invalid_boxes"] == 4  # 101..104
  assert c["train/clipped_boxes"] == 1  # 105
  assert c["train/images_without_annotations"] == 1
  assert c["train/converted_images"] == 1  # the TIFF
  assert c["train/images"] == c["eval/images"] == len(GOOD) + 1
  assert info.num_train_examples == info.num_eval_examples == len(GOOD) + 1

  gt = COCO()
  gt.dataset = info.coco_gt
  gt.createIndex()
  names = {im["file_name"] for im in info.coco_gt["images"]}
  assert names == set(GOOD) | {"empty.png"}
  by_id = {a["id"]: a for a in info.coco_gt["annotations"]}
  assert not {101, 102, 103, 104, 107} & set(by_id)
  assert by_id[105]["bbox"] == [50, 40, 14, 8]
  assert by_id[106]["iscrowd"] == 1


def test_folder_decodes_every_image_mode_like_pil(messy_folder):
  cfg = folder_config(*messy_folder)
  info = input_pipeline.get_dataset_info(cfg)
  files = {im["id"]: im["file_name"] for im in info.coco_gt["images"]}
  seen = set()
  for b in batches_of(cfg, image_size=SIZE, global_batch_size=4):
    for i in np.flatnonzero(b["mask"]):
      name = files[int(b["image_id"][i])]
      seen.add(name)
      got = b["image"][i] * STD + MEAN
      with Image.open(messy_folder[1] + "/" + name) as im:
        want = np.asarray(im.convert("RGB"), np.float64)
      tol = 4.0 if name.endswith(".jpg") else 0.01  # JPEG decoders may round differently
      assert np.abs(got - want).mean() < tol, name
      labels = sorted(b["labels"][i][b["valid"][i]].tolist())
      boxes = b["boxes"][i][b["valid"][i]]
      if name == "empty.png":
        assert labels == []
      elif name == "rgb.jpg":
        assert labels == [0, 1, 1]  # + the clipped box; crowd and invalid ones left out
      else:
        assert labels == [0, 1]
        want_boxes = np.asarray([[19, 16, 22, 20], [48, 32, 24, 24]]) / [64, 48, 64, 48]
        order = np.argsort(b["labels"][i][b["valid"][i]])
        np.testing.assert_allclose(boxes[order], want_boxes, atol=1e-6)
  assert seen == set(GOOD) | {"empty.png"}


def test_folder_training_reads_every_kept_image(messy_folder):
  cfg = folder_config(*messy_folder, mosaic_prob=0.5)
  it = input_pipeline.create_train_iterator(
    cfg, image_size=(32, 40), global_batch_size=7, seed=0, process_index=0, process_count=1
  )
  for _ in range(3):
    batch = next(it)
    assert np.isfinite(batch["image"]).all()
  assert it.counters["examples"] == 21


def test_folder_without_verification_fails_on_the_truncated_file(tmp_path):
  jpeg = GOOD["rgb.jpg"]()
  folder = write_folder(
    tmp_path, good_annotations([1, 2]), {"rgb.jpg": jpeg, "truncated.jpg": jpeg[: len(jpeg) // 2]}
  )
  cfg = folder_config(*folder, verify_images=False)
  assert input_pipeline.get_dataset_info(cfg).num_eval_examples == 2  # the header is fine
  with pytest.raises(tf.errors.InvalidArgumentError):
    batches_of(cfg, image_size=SIZE, global_batch_size=2)


@pytest.mark.parametrize(
  "annotation, message",
  [
    (dict(id=55, image_id=1, category_id=4, bbox=[1, 1, 5, 5]), "annotation id 55 (image rgb.jpg)"),
    (
      dict(id=56, image_id=77, category_id=3, bbox=[1, 1, 5, 5]),
      "annotation id 56 refers to image",
    ),
  ],
)
def test_folder_unknown_category_or_image_is_an_error(tmp_path, annotation, message):
  folder = write_folder(tmp_path, [annotation], {"rgb.jpg": GOOD["rgb.jpg"]()})
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    input_pipeline.get_dataset_info(folder_config(*folder))


def test_folder_missing_annotations_file_is_an_error(tmp_path):
  cfg = folder_config(str(tmp_path / "nope.json"), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="nope.json"):
    input_pipeline.get_dataset_info(cfg)


# ---------------------------------------------------------------------------------------------
# What predict.py uses: the label space without data, one image as the eval split reads it.
# ---------------------------------------------------------------------------------------------
def test_label_space_reads_no_tfds_data_and_no_images(tmp_path, no_network):
  empty = str(tmp_path / "tfds")  # no TFDS data at all
  coco = input_pipeline.label_space(data_config(name="coco", data_dir=empty))
  assert coco.num_classes == len(coco.class_names) == 91
  assert (coco.class_names[1], coco.class_names[90], coco.class_names[12]) == (
    "person",
    "toothbrush",
    "N/A",
  )
  np.testing.assert_array_equal(coco.label_to_category_id, np.arange(91))
  contiguous = data_config(name="coco", data_dir=empty, coco_category_ids_as_labels=False)
  np.testing.assert_array_equal(
    input_pipeline.label_space(contiguous).label_to_category_id, sources.COCO_CATEGORY_IDS
  )
  voc = input_pipeline.label_space(data_config(name="voc", data_dir=empty))
  assert voc.class_names[14] == "person"
  np.testing.assert_array_equal(voc.label_to_category_id, np.arange(1, 21))

  # A folder: only the train json is read; its image files need not exist.
  folder = write_folder(tmp_path / "folder", [], {"rgb.jpg": None})
  labels = input_pipeline.label_space(folder_config(*folder))
  assert labels.class_names == ["red", "green", "unused"]
  np.testing.assert_array_equal(labels.label_to_category_id, [3, 7, 9])

  cfg = data_config(name="synthetic", synthetic_num_train=4, synthetic_num_eval=2)
  assert_same_labels(input_pipeline.label_space(cfg), input_pipeline.get_dataset_info(cfg))
  with pytest.raises(ValueError, match="synthetic_num_classes"):
    input_pipeline.label_space(data_config(synthetic_num_classes=9))


def test_one_image_functions_are_the_eval_splits(messy_folder):
  cfg = folder_config(*messy_folder)
  gt = input_pipeline.get_dataset_info(cfg).coco_gt
  files = {im["id"]: im["file_name"] for im in gt["images"]}
  size = (40, 56)  # not the images' size: the resize is part of what is compared
  for b in batches_of(cfg, image_size=size, global_batch_size=4):
    for i in np.flatnonzero(b["mask"]):
      path = messy_folder[1] + "/" + files[int(b["image_id"][i])]
      image = input_pipeline.load_image(path)
      with Image.open(path) as im:
        want = np.asarray(im.convert("RGB"), np.float64)
      assert image.dtype == np.uint8 and image.shape == want.shape
      tol = 4.0 if path.endswith(".jpg") else 0.01  # JPEG decoders may round differently
      assert np.abs(image - want).mean() < tol, path
      x = input_pipeline.preprocess_eval_image(image, size)
      assert x.shape == (*size, 3) and x.dtype == np.float32
      np.testing.assert_allclose(x, b["image"][i], atol=1e-5, err_msg=path)
  for bad in ("corrupt.jpg", "truncated.jpg", "missing.jpg", "not_an_image.png"):
    with pytest.raises(input_pipeline.UnreadableImageError):
      input_pipeline.load_image(messy_folder[1] + "/" + bad)
