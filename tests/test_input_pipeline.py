"""Tests of `input_pipeline`: geometry against drawn rectangles, determinism and resumption,
multi-host sharding, the synthetic dataset and the static-shape batch contract."""

import importlib
import io

import numpy as np
import pytest
import tensorflow as tf
from input_helpers import BACKGROUND, MEAN, PALETTE, STD
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

import input_pipeline
from configs import base
from input_pipeline import pipeline, synthetic

pytestmark = pytest.mark.usefixtures("fresh_sources")


def synthetic_config(**overrides):
  cfg = base.get_data_config()
  cfg.update(
    dict(
      name="synthetic",
      synthetic_num_train=24,
      synthetic_num_eval=10,
      synthetic_image_size=(64, 80),
      max_boxes=6,
      crop_resize_sizes=(48, 56, 64),
      crop_min_size=32,
      crop_max_size=64,
    )
  )
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------------------------------------
# Geometry: filled rectangles through flip, crop, mosaic and resize.
# ---------------------------------------------------------------------------------------------
def apart(a, b):
  """Whether xyxy boxes a and b have at least 2 pixels between them (so resampled edges never
  mix two colours)."""
  return a[0] >= b[2] + 2 or b[0] >= a[2] + 2 or a[1] >= b[3] + 2 or b[1] >= a[3] + 2


def rectangle_record(rng, colors, size, crowd_color=None):
  """A PNG of non-overlapping filled rectangles (one per colour) and its record."""
  h, w = size
  image = Image.new("RGB", (w, h), BACKGROUND)
  draw = ImageDraw.Draw(image)
  boxes, labels = [], []
  for c in list(colors) + ([crowd_color] if crowd_color is not None else []):
    for _ in range(100):
      bw, bh = rng.integers(w // 6, w // 2), rng.integers(h // 6, h // 2)
      x0, y0 = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
      box = (x0, y0, x0 + bw, y0 + bh)
      if all(apart(box, b) for b in boxes):
        break
    else:
      continue  # no room left for this colour
    draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=tuple(int(v) for v in PALETTE[c]))
    boxes.append(box)
    labels.append(c)
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  boxes = np.asarray(boxes, np.float32) / np.asarray([w, h, w, h], np.float32)
  crowd = np.asarray([c == crowd_color for c in labels], bool)
  return dict(
    image=tf.constant(buf.getvalue()),
    size=tf.constant([h, w], tf.int32),
    boxes=tf.constant(boxes),
    labels=tf.constant(labels, tf.int32),
    crowd=tf.constant(crowd),
    image_id=tf.constant(0, tf.int64),
  )


def classify(image):
  """Palette index of every pixel of a normalized image, -1 where no colour is within 30."""
  rgb = image * STD + MEAN
  dist = np.linalg.norm(rgb[:, :, None, :] - PALETTE[None, None], axis=-1)
  return np.where(dist.min(-1) < 30, dist.argmin(-1), -1)


def check_boxes(example, seams=(), forbidden=(), blur=1.5):
  """Each valid box encloses exactly its rectangle's pixels; a visible rectangle without a box
  must have been cut (it touches the image border or one of the `seams` = (y, x) lines where
  mosaic quadrants meet; seams=None: where crops were made is unknown, not checked). Edges
  may blend with the background over `blur` pixels (more when resampled twice)."""
  classes = classify(example["image"])
  h, w = classes.shape
  labels = example["labels"][example["valid"]]
  boxes = example["boxes"][example["valid"]] * [w, h, w, h]
  assert len(set(labels.tolist())) == len(labels), "one box per rectangle"
  assert not set(labels.tolist()) & set(forbidden), "crowd objects are not targets"
  ys, xs = np.mgrid[0:h, 0:w] + 0.5
  for (cx, cy, bw, bh), c in zip(boxes, labels):
    x0, y0, x1, y1 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
    mine = classes == c
    assert mine.any(), f"box of colour {c} has no pixels of it"
    inside = (xs > x0 - 1) & (xs < x1 + 1) & (ys > y0 - 1) & (ys < y1 + 1)
    assert not (mine & ~inside).any(), f"pixels of colour {c} outside its box"
    core = (xs > x0 + blur) & (xs < x1 - blur) & (ys > y0 + blur) & (ys < y1 - blur)
    if core.any():
      assert mine[core].mean() > 0.97, f"box of colour {c} is not filled by it"
  if seams is None:
    return
  for c in set(np.unique(classes).tolist()) - {-1} - set(labels.tolist()) - set(forbidden):
    yy, xx = np.nonzero(classes == c)
    if len(yy) < 4:
      continue
    edges = [yy.min(), xx.min(), h - 1 - yy.max(), w - 1 - xx.max()]
    edges += [abs(v - s) for s in seams[0:1] for v in (yy.min(), yy.max() + 1)]
    edges += [abs(v - s) for s in seams[1:2] for v in (xx.min(), xx.max() + 1)]
    assert min(edges) <= 1, f"colour {c} is visible and uncut but has no box"


def example_fn(**overrides):
  cfg = synthetic_config(**overrides)
  aug = pipeline.AugmentConfig.from_data_config(cfg)
  return tf.function(
    pipeline.make_train_example_fn(lambda r: r, aug, (64, 80), cfg.max_boxes, seed=3)
  )


def numpy_example(out):
  return {k: v.numpy() for k, v in out.items()}


def test_boxes_follow_flip_and_crop_single_images():
  rng = np.random.default_rng(0)
  fn = example_fn(crop_prob=1.0, hflip_prob=0.5, mosaic_prob=0.0, max_boxes=8)
  cropped = 0
  for i in range(24):
    size = [(90, 120), (120, 70), (64, 80), (50, 160)][i % 4]
    record = rectangle_record(rng, rng.choice(12, 4, replace=False), size)
    ex = numpy_example(fn(tf.constant(i, tf.int64), record))
    check_boxes(ex)
    cropped += ex["valid"].sum() < 4
  assert cropped > 0, "some crops must cut rectangles away"


def test_crowd_objects_are_never_targets():
  rng = np.random.default_rng(1)
  fn = example_fn(crop_prob=0.5, mosaic_prob=0.0, max_boxes=8)
  crowd_visible = 0
  for i in range(6):
    record = rectangle_record(rng, [0, 1], (80, 100), crowd_color=2)
    ex = numpy_example(fn(tf.constant(i, tf.int64), record))
    check_boxes(ex, forbidden=[2])
    crowd_visible += (classify(ex["image"]) == 2).any()
  assert crowd_visible, "crowd objects stay in the image, they are only not targets"


@pytest.mark.parametrize("crop_prob", [0.0, 1.0])
def test_boxes_follow_mosaic(crop_prob):
  rng = np.random.default_rng(2)
  fn = example_fn(mosaic_prob=1.0, mosaic_crop_prob=0.7, crop_prob=crop_prob, max_boxes=12)
  for i in range(10):
    colors = rng.permutation(12).reshape(4, 3)
    sizes = [(90, 120), (120, 70), (64, 80), (70, 140)]
    records = [rectangle_record(rng, c, s) for c, s in zip(colors, sizes)]
    ex = numpy_example(fn(tf.constant(i, tf.int64), *records))
    # Without the crop after the mosaic the seams are at the quadrant borders. With it, the
    # mosaic is resampled a second time (up to 2x here), which widens the blended edges.
    if crop_prob == 0:
      check_boxes(ex, seams=(32, 40))
    else:
      check_boxes(ex, seams=None, blur=3.0)
    if crop_prob == 0:  # every quadrant holds something of its own image
      classes = classify(ex["image"])
      quadrants = [(slice(0, 32), slice(0, 40)), (slice(0, 32), slice(40, 80))]
      quadrants += [(slice(32, 64), slice(0, 40)), (slice(32, 64), slice(40, 80))]
      for q, (ys, xs) in enumerate(quadrants):
        seen = set(np.unique(classes[ys, xs]).tolist()) - {-1}
        assert seen <= set(colors[q].tolist())


def test_min_visible_fraction_zero_keeps_every_visible_rectangle():
  rng = np.random.default_rng(3)
  fn = example_fn(crop_prob=1.0, min_visible_fraction=0.0, max_boxes=8)
  for i in range(12):
    record = rectangle_record(rng, rng.choice(12, 4, replace=False), (90, 120))
    ex = numpy_example(fn(tf.constant(i, tf.int64), record))
    check_boxes(ex)
    classes = classify(ex["image"])
    visible = {c for c in np.unique(classes).tolist() if c >= 0 and (classes == c).sum() >= 4}
    assert visible <= set(ex["labels"][ex["valid"]].tolist())


# ---------------------------------------------------------------------------------------------
# The batch contract, the synthetic dataset, determinism, resumption, sharding.
# ---------------------------------------------------------------------------------------------
def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batch_contract_and_synthetic_info():
  cfg = synthetic_config(mosaic_prob=0.5, photometric=True)
  info = input_pipeline.get_dataset_info(cfg)
  assert info.num_classes == 4 and info.class_names == list(synthetic.SHAPES[:4])
  np.testing.assert_array_equal(info.label_to_category_id, [1, 2, 3, 4])
  assert (info.num_train_examples, info.num_eval_examples) == (24, 10)
  gt = COCO()
  gt.dataset = info.coco_gt
  gt.createIndex()
  assert len(gt.getImgIds()) == 10 and sorted(gt.getCatIds()) == [1, 2, 3, 4]
  it = input_pipeline.create_train_iterator(
    cfg, image_size=(64, 96), global_batch_size=4, seed=0, process_index=0, process_count=1
  )
  for batch in take(it, 3):
    assert sorted(batch) == ["boxes", "image", "labels", "valid"]
    assert batch["image"].shape == (4, 64, 96, 3) and batch["image"].dtype == np.float32
    assert batch["boxes"].shape == (4, 6, 4) and batch["boxes"].dtype == np.float32
    assert batch["labels"].shape == (4, 6) and batch["labels"].dtype == np.int32
    assert batch["valid"].shape == (4, 6) and batch["valid"].dtype == bool
    assert batch["valid"].any(axis=1).all()
    boxes = batch["boxes"][batch["valid"]]
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > 0).all()
    assert (boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-6).all()
    assert (boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-6).all()
    assert ((0 <= batch["labels"]) & (batch["labels"] < 4)).all()
    assert (batch["labels"][~batch["valid"]] == 0).all()
    assert (batch["boxes"][~batch["valid"]] == 0).all()
    assert abs(batch["image"].mean()) < 2.5 and 0.2 < batch["image"].std() < 3


def test_synthetic_generation_is_deterministic_and_boxes_are_tight():
  kw = dict(seed=5, num_classes=8, image_size=(96, 128), max_objects=6, object_size=(0.15, 0.5))
  a = synthetic.generate(12, split="train", **kw)
  b = synthetic.generate(12, split="train", **kw)
  e = synthetic.generate(12, split="eval", **kw)
  assert all(x["jpeg"] == y["jpeg"] for x, y in zip(a, b))
  assert all(x["jpeg"] != y["jpeg"] for x, y in zip(a, e))
  for ex in a:
    n = len(ex["labels"])
    assert 1 <= n <= 6 and ex["boxes"].shape == (n, 4)
    x0, y0, x1, y1 = ex["boxes"].T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 128).all() and (y1 <= 96).all()
    assert ((x1 - x0) >= 0.15 * 96 * 0.6 - 1).all(), "objects are 15-50% of the side"
    assert (ex["areas"] <= (x1 - x0) * (y1 - y0)).all()
    assert (ex["areas"] >= 0.3 * (x1 - x0) * (y1 - y0)).all()


def test_synthetic_object_size_bounds_the_boxes():
  kw = dict(seed=1, num_classes=4, image_size=(96, 128), max_objects=10)
  small = synthetic.generate(8, split="train", object_size=(0.06, 0.12), **kw)
  sides = np.concatenate([ex["boxes"][:, 2:] - ex["boxes"][:, :2] for ex in small])
  assert len(sides) > 8 * 3 and sides.max() <= 0.12 * 96 + 2  # tight boxes of drawn shapes
  with pytest.raises(ValueError, match="synthetic_object_size"):
    synthetic.generate(1, split="train", object_size=(0.3, 0.2), **kw)


def test_same_seed_same_batches_and_resume_at_step_k():
  cfg = synthetic_config(mosaic_prob=0.5, photometric=True, crop_prob=0.5)
  make = lambda seed, start: input_pipeline.create_train_iterator(
    cfg,
    image_size=(48, 64),
    global_batch_size=4,
    seed=seed,
    start_step=start,
    process_index=0,
    process_count=1,
  )
  full = take(make(7, 0), 9)  # 6 steps per epoch: crosses into the second epoch
  assert_same_batches(full, take(make(7, 0), 9))
  resumed = take(make(7, 4), 5)
  assert_same_batches(full[4:], resumed)
  assert not np.array_equal(full[0]["image"], full[1]["image"])


def test_other_seed_other_batches():
  cfg = synthetic_config(crop_prob=0.5)
  first = [
    next(
      input_pipeline.create_train_iterator(
        cfg, image_size=(48, 64), global_batch_size=4, seed=s, process_index=0, process_count=1
      )
    )
    for s in (1, 2)
  ]
  assert not np.array_equal(first[0]["image"], first[1]["image"])


def test_hosts_get_their_slice_of_the_global_batch():
  """Folders and synthetic: with 2 processes, host p's batch is rows p*b..(p+1)*b of the
  1-process global batch, so data does not depend on the host count."""
  cfg = synthetic_config(mosaic_prob=0.5)
  kw = dict(image_size=(48, 64), global_batch_size=4, seed=1, start_step=2)
  one = take(input_pipeline.create_train_iterator(cfg, process_index=0, process_count=1, **kw), 3)
  for p in range(2):
    it = input_pipeline.create_train_iterator(cfg, process_index=p, process_count=2, **kw)
    part = take(it, 3)
    sliced = [{k: v[2 * p : 2 * p + 2] for k, v in batch.items()} for batch in one]
    assert_same_batches(part, sliced)


def test_train_epochs_are_permutations_split_between_hosts():
  source = pipeline._get_source(synthetic_config())
  n = source.num_train_examples
  seen = {}
  for p in range(2):
    ds = source.train_records(
      start=0, seed=3, stream=0, process_index=p, process_count=2, local_batch=2, global_batch=4
    )
    seen[p] = [int(r["index"]) for _, r in ds.take(2 * n).as_numpy_iterator()]
  for epoch in range(2):
    ids = sum((seen[p][epoch * n // 2 : (epoch + 1) * n // 2] for p in range(2)), [])
    assert sorted(ids) == list(range(n)), "every image once per epoch over both hosts"
  assert set(seen[0][: n // 2]).isdisjoint(seen[1][: n // 2])
  assert seen[0][: n // 2] != seen[0][n // 2 : n], "epochs are shuffled differently"


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_every_image_once_on_any_host_count(process_count):
  cfg = synthetic_config()
  info = input_pipeline.get_dataset_info(cfg)
  ids, num_batches = [], set()
  for p in range(process_count):
    batches = list(
      input_pipeline.create_eval_iterator(
        cfg,
        image_size=(48, 64),
        global_batch_size=2 * process_count,
        process_index=p,
        process_count=process_count,
      )
    )
    num_batches.add(len(batches))
    for b in batches:
      assert b["image"].shape == (2, 48, 64, 3)
      assert b["orig_size"].dtype == np.int32 and b["image_id"].dtype == np.int64
      ids += b["image_id"][b["mask"]].tolist()
      np.testing.assert_array_equal(b["orig_size"][b["mask"]], [[64, 80]] * b["mask"].sum())
      assert not b["valid"][~b["mask"]].any() and (b["image"][~b["mask"]] == 0).all()
  assert len(num_batches) == 1, "every host runs the same number of eval batches"
  assert sorted(ids) == sorted(im["id"] for im in info.coco_gt["images"])


def test_eval_boxes_match_coco_gt():
  cfg = synthetic_config()
  info = input_pipeline.get_dataset_info(cfg)
  gt = COCO()
  gt.dataset = info.coco_gt
  gt.createIndex()
  for b in input_pipeline.create_eval_iterator(
    cfg, image_size=(32, 40), global_batch_size=4, process_index=0, process_count=1
  ):
    for i in np.flatnonzero(b["mask"]):
      anns = gt.loadAnns(gt.getAnnIds(imgIds=int(b["image_id"][i])))
      h, w = b["orig_size"][i]
      expected = sorted(
        (a["category_id"], *np.round(np.asarray(a["bbox"]) / [w, h, w, h], 5)) for a in anns
      )
      cx, cy, bw, bh = b["boxes"][i][b["valid"][i]].T
      got = sorted(
        zip(
          info.label_to_category_id[b["labels"][i][b["valid"][i]]],
          *np.round([cx - bw / 2, cy - bh / 2, bw, bh], 5),
        )
      )
      np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-4)


def test_objects_beyond_max_boxes_are_dropped_and_counted():
  cfg = synthetic_config(max_boxes=1, crop_prob=0.0, synthetic_max_objects=6)
  it = input_pipeline.create_train_iterator(
    cfg, image_size=(48, 64), global_batch_size=8, seed=0, process_index=0, process_count=1
  )
  batch = next(it)
  assert batch["valid"].shape == (8, 1) and batch["valid"].all()
  assert it.counters["truncated_boxes"] > 0 and it.counters["examples"] == 8


def test_tensorflow_is_kept_off_accelerators_on_request_only(monkeypatch, caplog):
  calls = []
  monkeypatch.setattr(tf.config, "set_visible_devices", lambda d, kind: calls.append((d, kind)))
  importlib.reload(input_pipeline)  # importing the package hides nothing
  assert calls == []
  input_pipeline.keep_tensorflow_off_accelerators()
  assert calls == [([], "GPU"), ([], "TPU")]

  def too_late(devices, kind):
    raise RuntimeError("Visible devices cannot be modified after being initialized")

  monkeypatch.setattr(tf.config, "set_visible_devices", too_late)
  monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind: ["x"] if kind == "GPU" else [])
  input_pipeline.keep_tensorflow_off_accelerators()
  (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert "before keep_tensorflow_off_accelerators() and may hold GPU memory" in warning
