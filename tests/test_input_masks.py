"""Tests of instance masks in `input_pipeline` (`data.masks`): the exact area resampling
against integer counting, masks following flip, crop, mosaic and resize on drawn shapes, the
synthetic dataset's masks against its pycocotools ground truth, COCO-format segmentations
(polygons, RLE, bad input), COCO panoptic folders and TFDS coco/2017_panoptic (under
`tfds.testing.mock_data`), and the panoptic label space and ground truth."""

import io
import json
import logging
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from input_helpers import BACKGROUND, MEAN, PALETTE, STD
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import input_pipeline
from configs import base
from input_pipeline import masks, pipeline, sources

pytestmark = pytest.mark.usefixtures("fresh_sources")


def area_oracle(mask, out_shape):
  """The area average of a binary `[h, w]` mask over a `out_shape` grid, >= 1/2, by integer
  counting on a common refinement of both grids."""
  (h, w), (hm, wm) = mask.shape, out_shape
  fy, fx = hm // math.gcd(h, hm), wm // math.gcd(w, wm)
  fine = np.repeat(np.repeat(np.asarray(mask, np.int64), fy, 0), fx, 1)
  by, bx = h * fy // hm, w * fx // wm  # sub-pixels per output pixel along each axis
  count = fine.reshape(hm, by, wm, bx).sum((1, 3))
  return (2 * count >= by * bx).astype(np.uint8)


def blocky_masks(rng, n, h, w, block=3):
  """Random masks made of `block`-sized squares (so they have interiors and edges)."""
  coarse = rng.random((n, h // block + 1, w // block + 1)) < 0.5
  return np.repeat(np.repeat(coarse, block, 1), block, 2)[:, :h, :w].astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The resampling.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "src, out",
  [((60, 90), (16, 24)), ((64, 80), (16, 20)), ((37, 51), (32, 48)), ((7, 9), (14, 27))],
)
def test_resample_is_the_exact_area_average_thresholded_at_half(src, out):
  m = blocky_masks(np.random.default_rng(0), 3, *src)
  m[1] = 0  # an empty mask stays empty
  ys = masks.edges(out[0], 1, 0, out[0], out[0], 0, out[0], src[0])
  xs = masks.edges(out[1], 1, 0, out[1], out[1], 0, out[1], src[1])
  got = masks.resample(tf.constant(m), ys, xs).numpy()
  for k in range(3):
    np.testing.assert_array_equal(got[k], area_oracle(m[k], out))


def test_resample_maps_a_placed_part_through_a_canvas_window():
  """A 6 x 8 source resized 2x into part (2, 4, 12, 16) of a 24 x 32 canvas, whose window
  (4, 6, 16, 16) is resized to a 16 x 16 output, at stride 2: one resampling equals building
  the canvas and cropping it."""
  src = blocky_masks(np.random.default_rng(1), 2, 6, 8, block=2)
  canvas = np.zeros((2, 24, 32), np.uint8)
  canvas[:, 2:14, 4:20] = np.repeat(np.repeat(src, 2, 1), 2, 2)
  crop = canvas[:, 4:20, 6:22]
  got = pipeline._resample_part(tf.constant(src), (16, 16), 2, (4, 6, 16, 16), (2, 4, 12, 16))
  for k in range(2):
    np.testing.assert_array_equal(got[k].numpy(), area_oracle(crop[k], (8, 8)))


# ---------------------------------------------------------------------------------------------
# Geometry: drawn asymmetric shapes through flip, crop, mosaic and resize.
# ---------------------------------------------------------------------------------------------
def apart(a, b):
  return a[0] >= b[2] + 2 or b[0] >= a[2] + 2 or a[1] >= b[3] + 2 or b[1] >= a[3] + 2


def is_rectangle(color):
  return color % 3 == 0


def shapes_record(rng, colors, size):
  """A PNG of non-overlapping filled shapes, one per colour, with their exact masks:
  rectangles (`is_rectangle`: a crop keeps their box tight) and, without mirror symmetry,
  right triangles and L shapes."""
  h, w = size
  image = np.zeros((h, w, 3), np.uint8) + np.uint8(BACKGROUND)
  boxes, labels, object_masks = [], [], []
  for c in colors:
    for _ in range(100):
      bw, bh = rng.integers(w // 5, w // 2), rng.integers(h // 5, h // 2)
      x0, y0 = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
      box = (x0, y0, x0 + bw, y0 + bh)
      if all(apart(box, b) for b in boxes):
        break
    else:
      continue
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if is_rectangle(c):
      draw.rectangle([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=1)
    elif c % 2:
      draw.polygon([(x0, y0), (x0 + bw, y0 + bh), (x0, y0 + bh)], fill=1)
    else:
      draw.rectangle([x0, y0, x0 + bw // 3, y0 + bh - 1], fill=1)
      draw.rectangle([x0, y0 + bh - bh // 3, x0 + bw - 1, y0 + bh - 1], fill=1)
    m = np.asarray(canvas, np.uint8)
    ys, xs = np.nonzero(m)
    image[m > 0] = PALETTE[c].astype(np.uint8)
    boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    labels.append(c)
    object_masks.append(m)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return dict(
    image=tf.constant(buf.getvalue()),
    size=tf.constant([h, w], tf.int32),
    boxes=tf.constant(np.asarray(boxes, np.float32) / np.asarray([w, h, w, h], np.float32)),
    labels=tf.constant(labels, tf.int32),
    crowd=tf.zeros([len(labels)], tf.bool),
    image_id=tf.constant(0, tf.int64),
    masks=tf.constant(np.stack(object_masks)),
  )


def example_fn(out_size, stride, **overrides):
  cfg = base.get_data_config()
  cfg.update(dict(crop_resize_sizes=(48, 56, 64), crop_min_size=32, crop_max_size=64, max_boxes=12))
  cfg.update(overrides)
  aug = pipeline.AugmentConfig.from_data_config(cfg)
  fn = pipeline.make_train_example_fn(
    lambda r: r, aug, out_size, cfg.max_boxes, seed=3, mask_stride=stride
  )
  return tf.function(fn, reduce_retracing=True)  # records differ in size: trace ~twice


def classify(image):
  """Palette index of the colour nearest to every pixel of a normalized image (-1: the
  background), so a pixel blended at an edge goes to the side it is closer to."""
  rgb = image * STD + MEAN
  colors = np.concatenate([PALETTE, [BACKGROUND]])
  nearest = np.linalg.norm(rgb[:, :, None, :] - colors[None, None], axis=-1).argmin(-1)
  return np.where(nearest == len(PALETTE), -1, nearest)


def assert_mask_in_box(m, box, what, tight):
  """The bounding box of mask `m` lies inside `box` (cxcywh in mask pixels; 1 pixel of
  rounding) and, if `tight`, is the box: no more than 2 pixels smaller (thin tips cover
  less than half of a mask pixel)."""
  cx, cy, bw, bh = box
  ys, xs = np.nonzero(m)
  got = np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
  want = np.asarray([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
  outward = np.concatenate([want[:2] - got[:2], got[2:] - want[2:]])
  assert outward.max() <= 1.01, f"{what}: mask {got} outside box {want}"
  if tight:
    assert outward.min() >= -2.01, f"{what}: mask {got}, box {want}"


def check_masks(ex, stride, cropped, min_iou=0.75):
  """Every valid slot's mask lies in the slot's box and covers the pixels of the slot's
  colour in the image (IoU at mask resolution); its bounding box is the box (to 1-2 mask
  pixels) for rectangles, and for every shape when nothing was `cropped` (a crop clips a
  shape's box, not the box of what stays visible of it: the reference's boxes too); invalid
  slots are zeros."""
  classes = classify(ex["image"])
  h, w = classes.shape
  assert ex["masks"].shape[1:] == (h // stride, w // stride) and ex["masks"].dtype == np.uint8
  assert not ex["masks"][~ex["valid"]].any()
  for m, box, label in zip(ex["masks"][ex["valid"]], ex["boxes"][ex["valid"]], ex["labels"]):
    cx, cy, bw, bh = box * [w, h, w, h] / stride
    tight = is_rectangle(label) or not cropped
    if not m.any():  # a sliver left by a crop may vanish at the mask resolution
      assert not tight or min(bw, bh) < 2, f"colour {label}: empty mask for box {box}"
      continue
    assert_mask_in_box(m, (cx, cy, bw, bh), f"colour {label}", tight)
    # The colour's pixels in the box: blends of two colours elsewhere (at mosaic seams) can
    # look like a third colour.
    color = area_oracle(classes == label, m.shape)
    rows, cols = np.arange(m.shape[0])[:, None] + 0.5, np.arange(m.shape[1])[None, :] + 0.5
    color &= (np.abs(rows - cy) < bh / 2 + 1) & (np.abs(cols - cx) < bw / 2 + 1)
    iou = (color & m).sum() / max((color | m).sum(), 1)
    if color.sum() >= 30:  # smaller: edge pixels of the image decide the IoU
      assert iou >= min_iou, f"colour {label}: mask IoU {iou:.2f} with its pixels"


def numpy_example(out):
  return {k: v.numpy() for k, v in out.items()}


def test_masks_follow_resize_and_flip_exactly():
  rng = np.random.default_rng(0)
  stride = 4  # stride 1: test_masks_of_objects_beyond_max_boxes_are_dropped_with_them
  for hflip in (0.0, 1.0):
    fn = example_fn((64, 80), stride, hflip_prob=hflip, crop_prob=0.0, mosaic_prob=0.0)
    record = shapes_record(rng, rng.choice(12, 4, replace=False), (90, 120))
    ex = numpy_example(fn(tf.constant(0, tf.int64), record))
    check_masks(ex, stride, cropped=False)
    source = record["masks"].numpy()[:, :, ::-1] if hflip else record["masks"].numpy()
    n = ex["valid"].sum()
    assert n == len(source)
    for k in range(n):
      np.testing.assert_array_equal(
        ex["masks"][k], area_oracle(source[k], (64 // stride, 80 // stride))
      )


def test_masks_follow_crop():
  rng = np.random.default_rng(1)
  stride = 2
  fn = example_fn((64, 80), stride, crop_prob=1.0, hflip_prob=0.5, mosaic_prob=0.0)
  cropped = 0
  for i in range(6):
    size = [(90, 120), (120, 70), (64, 80), (50, 160)][i % 4]
    record = shapes_record(rng, rng.choice(12, 4, replace=False), size)
    ex = numpy_example(fn(tf.constant(i, tf.int64), record))
    check_masks(ex, stride, cropped=True)
    cropped += ex["valid"].sum() < len(record["labels"])
  assert cropped, "some crops must drop objects (and their masks with them)"


def test_masks_follow_mosaic():
  """Mosaic then the crop step: each part's masks map through the crop in one resampling
  (test_resample_maps_a_placed_part_through_a_canvas_window checks that mapping exactly)."""
  rng = np.random.default_rng(2)
  fn = example_fn((128, 160), 2, mosaic_prob=1.0, mosaic_crop_prob=0.7, crop_prob=1.0)
  for i in range(3):
    colors = rng.permutation(12).reshape(4, 3)
    sizes = [(90, 120), (120, 70), (64, 80), (70, 140)]
    records = [shapes_record(rng, c, s) for c, s in zip(colors, sizes)]
    ex = numpy_example(fn(tf.constant(i, tf.int64), *records))
    # The mosaic image is resampled twice with the crop after it (its edges blur more); the
    # masks once.
    check_masks(ex, 2, cropped=True, min_iou=0.6)
    assert ex["valid"].sum() > 3


def test_masks_of_objects_beyond_max_boxes_are_dropped_with_them():
  rng = np.random.default_rng(3)
  fn = example_fn((64, 80), 1, crop_prob=0.0, hflip_prob=0.0, mosaic_prob=0.0, max_boxes=2)
  record = shapes_record(rng, [0, 1, 2, 3], (64, 80))
  ex = numpy_example(fn(tf.constant(0, tf.int64), record))
  assert ex["valid"].tolist() == [True, True] and ex["masks"].shape == (2, 64, 80)
  np.testing.assert_array_equal(ex["masks"], record["masks"].numpy()[:2])
  check_masks(ex, 1, cropped=False)


# ---------------------------------------------------------------------------------------------
# The synthetic dataset.
# ---------------------------------------------------------------------------------------------
def synthetic_config(**overrides):
  cfg = base.get_data_config()
  cfg.update(
    dict(
      name="synthetic",
      synthetic_num_train=12,
      synthetic_num_eval=6,
      synthetic_image_size=(64, 80),
      max_boxes=6,
      crop_resize_sizes=(48, 56, 64),
      crop_min_size=32,
      crop_max_size=64,
      masks=True,
    )
  )
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize("image_size, stride", [((64, 80), 1), ((48, 60), 4)])
def test_synthetic_eval_masks_are_the_resized_ground_truth_exactly(image_size, stride):
  cfg = synthetic_config(mask_stride=stride)
  info = input_pipeline.get_dataset_info(cfg)
  gt = COCO()
  gt.dataset = info.coco_gt
  gt.createIndex()
  hm, wm = image_size[0] // stride, image_size[1] // stride
  seen = 0
  for b in input_pipeline.create_eval_iterator(
    cfg, image_size=image_size, global_batch_size=4, process_index=0, process_count=1
  ):
    assert b["masks"].shape == (4, 6, hm, wm) and b["masks"].dtype == np.uint8
    assert not b["masks"][~b["mask"]].any()
    for i in np.flatnonzero(b["mask"]):
      anns = gt.loadAnns(gt.getAnnIds(imgIds=int(b["image_id"][i])))
      assert b["valid"][i].sum() == len(anns)
      for t, ann in enumerate(anns):  # the ground truth's object order
        full = gt.annToMask(ann)  # pycocotools decodes the RLE: the oracle
        assert full.sum() == ann["area"]
        np.testing.assert_array_equal(b["masks"][i, t], area_oracle(full, (hm, wm)))
        seen += 1
  assert seen > 6


def test_synthetic_masks_are_visible_parts_and_segm_evaluation_works():
  cfg = synthetic_config()
  info = input_pipeline.get_dataset_info(cfg)
  gt = COCO()
  gt.dataset = info.coco_gt
  gt.createIndex()
  for image_id in gt.getImgIds():
    anns = gt.loadAnns(gt.getAnnIds(imgIds=image_id))
    stack = np.stack([gt.annToMask(a) for a in anns])
    assert stack.sum(0).max() <= 1, "visible parts never overlap"
    ids = info.panoptic_gt.id_map(image_id)
    for k, a in enumerate(anns):  # segment k + 1 of the panoptic ground truth is object k
      np.testing.assert_array_equal(ids == k + 1, stack[k])
      x, y, w, h = a["bbox"]
      ys, xs = np.nonzero(stack[k])
      assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
  results = [
    dict(image_id=a["image_id"], category_id=a["category_id"], segmentation=a["segmentation"])
    for a in gt.dataset["annotations"]
  ]
  for r in results:
    r["score"] = 1.0
  evaluator = COCOeval(gt, gt.loadRes(results), "segm")
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  assert evaluator.stats[0] == pytest.approx(1.0)
  assert info.panoptic_gt.folder == "" and info.is_thing.all()
  assert info.panoptic_gt.categories == [
    dict(id=k + 1, name=n, isthing=1) for k, n in enumerate(info.class_names)
  ]


def test_synthetic_train_batches_carry_aligned_masks():
  cfg = synthetic_config(mosaic_prob=0.5, crop_prob=0.5, mask_stride=2)
  it = input_pipeline.create_train_iterator(
    cfg, image_size=(64, 96), global_batch_size=4, seed=0, process_index=0, process_count=1
  )
  nonempty = total = 0
  for _ in range(1):
    batch = next(it)
    assert sorted(batch) == ["boxes", "image", "labels", "masks", "valid"]
    assert batch["masks"].shape == (4, 6, 32, 48)
    assert not batch["masks"][~batch["valid"]].any()
    for b in range(4):
      masks_b, boxes_b = batch["masks"][b][batch["valid"][b]], batch["boxes"][b][batch["valid"][b]]
      for m, (cx, cy, bw, bh) in zip(masks_b, boxes_b * [48, 32, 48, 32]):
        nonempty += m.any()
        total += 1
        if m.any():  # crops clip the boxes of shapes: only inside, not tight
          assert_mask_in_box(m, (cx, cy, bw, bh), f"batch item {b}", tight=False)
  assert nonempty >= 0.9 * total
  assert it.counters["invalid_masks"] == 0


def test_mask_config_errors():
  with pytest.raises(ValueError, match=r"data.mask_stride=3 must be a positive divisor"):
    input_pipeline.create_train_iterator(
      synthetic_config(mask_stride=3),
      image_size=(64, 80),
      global_batch_size=2,
      seed=0,
      process_index=0,
      process_count=1,
    )
  cfg = base.get_data_config()
  cfg.update(name="coco", masks=True)
  with pytest.raises(ValueError, match=r"TFDS coco/2017 has no instance masks; use"):
    input_pipeline.get_dataset_info(cfg)


# ---------------------------------------------------------------------------------------------
# COCO-format folders: polygons and RLE, and bad input.
# ---------------------------------------------------------------------------------------------
H, W = 40, 48


def known_mask(rng):
  m = np.zeros((H, W), np.uint8)
  y, x = rng.integers(0, H // 2), rng.integers(0, W // 2)
  m[y : y + rng.integers(6, H // 2), x : x + rng.integers(6, W // 2)] = 1
  m[y, x] = 0  # not a rectangle
  return m


def uncompressed(m):
  """COCO's uncompressed RLE of a mask (column-major runs, starting with zeros)."""
  flat = np.asarray(m, np.uint8).flatten(order="F")
  change = np.flatnonzero(np.diff(flat)) + 1
  runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
  return dict(size=[H, W], counts=([0] if flat[0] else []) + runs)


def bbox_of(m):
  ys, xs = np.nonzero(m)
  return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


@pytest.fixture(scope="module")
def segm_folder(tmp_path_factory):
  """Three images; annotations with every segmentation form, and broken ones."""
  root = tmp_path_factory.mktemp("segm")
  rng = np.random.default_rng(7)
  rle_mask, string_mask, crowd_mask = known_mask(rng), known_mask(rng), known_mask(rng)
  compressed = mask_utils.encode(np.asfortranarray(string_mask))
  compressed["counts"] = compressed["counts"].decode("ascii")
  triangle = [4.0, 4.0, 30.0, 4.0, 4.0, 30.0]
  segs = [  # (image, segmentation, crowd, box)
    (1, [triangle], 0, [4, 4, 27, 27]),
    (1, uncompressed(rle_mask), 0, bbox_of(rle_mask)),
    (2, compressed, 0, bbox_of(string_mask)),
    (2, [[10.0, 10.0, 20.0, 10.0], [10, 20, 30, 20, 10, 35]], 0, [10, 20, 21, 16]),
    (2, uncompressed(crowd_mask), 1, bbox_of(crowd_mask)),
    (3, [], 0, [1, 1, 5, 5]),  # invalid from here on
    (3, [[1.0, 2.0, 3.0, 4.0]], 0, [1, 1, 5, 5]),
    (3, dict(size=[H + 1, W], counts=[H * W]), 0, [1, 1, 5, 5]),
    (3, dict(size=[H, W], counts=[5, 3]), 0, [1, 1, 5, 5]),
    (3, None, 0, [1, 1, 5, 5]),
    (3, dict(size=[H, W], counts="(("), 0, [1, 1, 5, 5]),
  ]
  annotations = []
  for k, (iid, seg, crowd, box) in enumerate(segs):
    ann = dict(id=k + 1, image_id=iid, category_id=1 + k % 2, bbox=box, area=100, iscrowd=crowd)
    if seg is not None:
      ann["segmentation"] = seg
    annotations.append(ann)
  images = []
  for iid in (1, 2, 3):
    Image.new("RGB", (W, H), (90, 90, 90)).save(root / f"{iid}.png")
    images.append(dict(id=iid, file_name=f"{iid}.png", width=W, height=H))
  categories = [dict(id=1, name="a"), dict(id=2, name="b")]
  path = root / "annotations.json"
  path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
  return dict(
    json=str(path),
    images=str(root),
    rle=rle_mask,
    string=string_mask,
    crowd=crowd_mask,
    triangle=triangle,
  )


def folder_config(folder, **overrides):
  cfg = base.get_data_config()
  cfg.update(
    dict(
      name="coco_folder",
      train_annotations=folder["json"],
      train_images=folder["images"],
      eval_annotations=folder["json"],
      eval_images=folder["images"],
      max_boxes=4,
      masks=True,
      crop_resize_sizes=(40,),
      crop_min_size=24,
      crop_max_size=40,
    )
  )
  cfg.update(overrides)
  return cfg


def test_folder_segmentations_polygons_and_rle(segm_folder, caplog):
  cfg = folder_config(segm_folder, mask_stride=1)
  with caplog.at_level(logging.WARNING):
    info = input_pipeline.get_dataset_info(cfg)
  assert info.counters["eval/invalid_masks"] == 6
  assert info.counters["eval/degenerate_polygons"] == 1
  log = caplog.text
  assert "invalid mask" in log and "annotation 6 (3.png): no polygon" in log
  assert "annotation 7 (3.png): only degenerate polygons" in log
  assert "annotation 8 (3.png): RLE size [41, 48] differs from the image's [40, 48]" in log
  assert "annotation 9 (3.png): RLE counts are negative or do not sum to 40 x 48" in log
  assert "annotation 11 (3.png): RLE counts string is malformed" in log
  gt = COCO()
  gt.dataset = info.coco_gt
  gt.createIndex()
  assert sorted(gt.anns) == [1, 2, 3, 4, 5]
  assert gt.anns[5]["iscrowd"] == 1
  np.testing.assert_array_equal(gt.annToMask(gt.anns[2]), segm_folder["rle"])
  np.testing.assert_array_equal(gt.annToMask(gt.anns[3]), segm_folder["string"])
  np.testing.assert_array_equal(gt.annToMask(gt.anns[5]), segm_folder["crowd"])
  batches = list(
    input_pipeline.create_eval_iterator(
      cfg, image_size=(H, W), global_batch_size=3, process_index=0, process_count=1
    )
  )
  (b,) = batches
  order = {int(iid): i for i, iid in enumerate(b["image_id"])}
  one, two, three = (b["masks"][order[i]] for i in (1, 2, 3))
  assert b["valid"][order[1]].sum() == 2 and b["valid"][order[2]].sum() == 2  # crowd: no target
  assert not b["valid"][order[3]].any()
  np.testing.assert_array_equal(one[1], segm_folder["rle"])
  np.testing.assert_array_equal(two[0], segm_folder["string"])
  # The triangle, against PIL's rasterization of the same polygon.
  pil = Image.new("L", (W, H), 0)
  ImageDraw.Draw(pil).polygon(list(zip(*[iter(segm_folder["triangle"])] * 2)), fill=1)
  pil = np.asarray(pil, bool)
  assert (pil & (one[0] > 0)).sum() / (pil | (one[0] > 0)).sum() > 0.85
  # The two-part polygon kept its valid part, the triangle (10, 20), (30, 20), (10, 35).
  pil = Image.new("L", (W, H), 0)
  ImageDraw.Draw(pil).polygon([(10, 20), (30, 20), (10, 35)], fill=1)
  pil = np.asarray(pil, bool)
  assert (pil & (two[1] > 0)).sum() / (pil | (two[1] > 0)).sum() > 0.8
  assert not three.any()
  results = [
    dict(image_id=a["image_id"], category_id=a["category_id"], segmentation=a["segmentation"])
    for a in gt.dataset["annotations"]
    if not a["iscrowd"]
  ]
  for r in results:
    r["score"] = 1.0
  evaluator = COCOeval(gt, gt.loadRes(results), "segm")
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  assert evaluator.stats[0] == pytest.approx(1.0)


def test_folder_masks_off_reads_no_segmentation(segm_folder):
  info = input_pipeline.get_dataset_info(folder_config(segm_folder, masks=False))
  assert "eval/invalid_masks" not in info.counters
  assert len(info.coco_gt["annotations"]) == 11
  assert not any("segmentation" in a for a in info.coco_gt["annotations"])


def test_folder_train_masks_at_stride_4(segm_folder):
  cfg = folder_config(segm_folder, mask_stride=4, crop_prob=0.0, hflip_prob=0.0)
  it = input_pipeline.create_train_iterator(
    cfg, image_size=(H, W), global_batch_size=3, seed=0, process_index=0, process_count=1
  )
  batch = next(it)
  assert batch["masks"].shape == (3, 4, 10, 12)
  rle = area_oracle(segm_folder["rle"], (10, 12))
  assert any((m == rle).all() for m in batch["masks"].reshape(-1, 10, 12))


def test_compressed_counts_decoder_matches_pycocotools():
  rng = np.random.default_rng(4)
  for _ in range(5):
    m = blocky_masks(rng, 1, 37, 23, block=2)[0]
    counts = mask_utils.encode(np.asfortranarray(m))["counts"].decode("ascii")
    got = masks._decode_counts_string(counts)
    assert sum(got) == m.size and min(got) >= 0
    back = mask_utils.frPyObjects(dict(size=[37, 23], counts=got), 37, 23)
    np.testing.assert_array_equal(mask_utils.decode(back), m)
  assert masks._decode_counts_string("((") is None


# ---------------------------------------------------------------------------------------------
# COCO panoptic: folders and TFDS coco/2017_panoptic.
# ---------------------------------------------------------------------------------------------
PANOPTIC_CATEGORIES = [
  dict(id=1, name="person", isthing=1),
  dict(id=3, name="car", isthing=1),
  dict(id=92, name="banner", isthing=0),
]


def id_map(rng, h, w, ids):
  """Segment ids in vertical bands with a random blob per id (every id present)."""
  out = np.zeros((h, w), np.int64)
  bands = np.array_split(np.arange(w), len(ids) + 1)
  for sid, cols in zip(ids, bands[1:]):
    out[:, cols] = sid
    y = rng.integers(0, h - 4)
    out[y : y + 4, bands[0][:2]] = sid
  return out


def segments_of(ids, specs):
  """segments_info of an id map: (id, category_id, iscrowd) -> with area and bbox."""
  segments = []
  for sid, cid, crowd in specs:
    m = ids == sid
    segments.append(
      dict(
        id=sid,
        category_id=cid,
        iscrowd=crowd,
        area=int(m.sum()),
        bbox=bbox_of(m) if m.any() else [0, 0, 2, 2],
      )
    )
  return segments


@pytest.fixture(scope="module")
def panoptic_folder(tmp_path_factory):
  """Images 1 and 4 are good (1 lists a segment its PNG lacks, and its PNG has an unlisted
  id); image 2 has no PNG, image 3's PNG has another size."""
  root = tmp_path_factory.mktemp("panoptic")
  (root / "images").mkdir()
  (root / "pngs").mkdir()
  rng = np.random.default_rng(5)
  images, annotations, maps = [], [], {}
  specs = {
    1: [(11, 1, 0), (12, 92, 0), (13, 3, 0), (55, 1, 0)],
    2: [(21, 1, 0)],
    3: [(31, 3, 0)],
    4: [(41, 3, 0), (42, 1, 1), (43 + 256 * 7, 92, 0)],
  }
  for iid, spec in specs.items():
    h, w = 30 + 2 * iid, 40
    present = [s for s, _, _ in spec if s != 55] + ([77] if iid == 1 else [])
    ids = id_map(rng, h, w, present)
    maps[iid] = ids
    Image.new("RGB", (w, h), (100, 50, 20)).save(root / "images" / f"{iid:04d}.jpg")
    if iid != 2:
      png_ids = ids[:-2] if iid == 3 else ids
      input_pipeline.write_panoptic_png(root / "pngs" / f"{iid:04d}.png", png_ids)
    images.append(dict(id=iid, file_name=f"{iid:04d}.jpg", width=w, height=h))
    annotations.append(
      dict(image_id=iid, file_name=f"{iid:04d}.png", segments_info=segments_of(ids, spec))
    )
  path = root / "panoptic.json"
  data = dict(images=images, annotations=annotations, categories=PANOPTIC_CATEGORIES)
  path.write_text(json.dumps(data))
  return dict(json=str(path), images=str(root / "images"), pngs=str(root / "pngs"), maps=maps)


def panoptic_config(folder, **overrides):
  cfg = base.get_data_config()
  cfg.update(
    dict(
      name="coco_panoptic_folder",
      train_annotations=folder["json"],
      train_images=folder["images"],
      train_panoptic_pngs=folder["pngs"],
      eval_annotations=folder["json"],
      eval_images=folder["images"],
      eval_panoptic_pngs=folder["pngs"],
      max_boxes=5,
      masks=True,
      mask_stride=1,
    )
  )
  cfg.update(overrides)
  return cfg


def test_panoptic_folder_labels_masks_and_bad_input(panoptic_folder, caplog):
  cfg = panoptic_config(panoptic_folder)
  with caplog.at_level(logging.WARNING):
    info = input_pipeline.get_dataset_info(cfg)
  assert info.num_classes == 250 and info.class_names[92] == "banner"
  assert info.class_names[2] == "N/A" and info.is_thing[[1, 3]].all()
  assert not info.is_thing[[0, 2, 92, 200]].any()
  labels = input_pipeline.label_space(cfg)
  np.testing.assert_array_equal(labels.is_thing, info.is_thing)
  c = info.counters
  assert (c["eval/skipped_images"], c["eval/images"]) == (2, 2)
  assert (c["eval/missing_segments"], c["eval/unlisted_segments"]) == (1, 1)
  assert "0002.jpg: panoptic PNG" in caplog.text and "is missing" in caplog.text
  assert "0003.jpg: panoptic PNG" in caplog.text and "is 40x34, its image 40x36" in caplog.text
  assert "segment 55 (0001.png)" in caplog.text and "0001.png: id 77" in caplog.text

  (b,) = list(
    input_pipeline.create_eval_iterator(
      cfg, image_size=(32, 40), global_batch_size=2, process_index=0, process_count=1
    )
  )
  for i, iid in enumerate(b["image_id"]):
    ids = panoptic_folder["maps"][int(iid)]
    wanted = {1: [(11, 1), (12, 92), (13, 3)], 4: [(41, 3), (43 + 256 * 7, 92)]}[int(iid)]
    assert b["valid"][i].sum() == len(wanted)  # the crowd segment 42 is no target
    assert b["labels"][i][: len(wanted)].tolist() == [cid for _, cid in wanted]
    for t, (sid, _) in enumerate(wanted):
      np.testing.assert_array_equal(b["masks"][i, t], area_oracle(ids == sid, (32, 40)))

  gt = info.panoptic_gt
  assert gt.folder == panoptic_folder["pngs"] and gt.categories == PANOPTIC_CATEGORIES
  assert [a["image_id"] for a in gt.json["annotations"]] == [1, 4]
  assert [s["id"] for s in gt.segments_info(1)] == [11, 12, 13]
  one = gt.id_map(1)
  np.testing.assert_array_equal(one, np.where(panoptic_folder["maps"][1] == 77, 0, one))
  assert (one[panoptic_folder["maps"][1] == 11] == 11).all() and not (one == 77).any()
  coco = COCO()
  coco.dataset = info.coco_gt
  coco.createIndex()
  assert len(coco.anns) == 6 and sorted(coco.getCatIds()) == [1, 3, 92]

  from detr_jax import panoptic  # PQ of the ground truth against itself

  images = [
    (i, gt.id_map(i), gt.segments_info(i), gt.id_map(i), gt.segments_info(i)) for i in (1, 4)
  ]
  assert panoptic.pq_from_segments(images, gt.categories)["All"]["pq"] == pytest.approx(1.0)


def test_panoptic_folder_contiguous_labels_and_training(panoptic_folder):
  cfg = panoptic_config(
    panoptic_folder, coco_category_ids_as_labels=False, mask_stride=2, crop_resize_sizes=(32,)
  )
  info = input_pipeline.get_dataset_info(cfg)
  assert info.num_classes == 3 and info.class_names == ["person", "car", "banner"]
  assert info.is_thing.tolist() == [True, True, False]
  it = input_pipeline.create_train_iterator(
    cfg, image_size=(32, 40), global_batch_size=2, seed=1, process_index=0, process_count=1
  )
  for _ in range(1):
    batch = next(it)
    assert batch["masks"].shape == (2, 5, 16, 20)
    assert_masks_in_boxes(batch)
  with pytest.raises(ValueError, match=r"data.eval_panoptic_pngs \(the folder of its PNGs\)"):
    input_pipeline.get_dataset_info(panoptic_config(panoptic_folder, eval_panoptic_pngs=""))


def assert_masks_in_boxes(batch):
  """Training masks lie in their boxes. (A crop may keep a segment's box, by its visible
  fraction, and none of its pixels: as in the reference, boxes decide what is kept.)"""
  _, _, hm, wm = batch["masks"].shape
  masks, boxes = batch["masks"][batch["valid"]], batch["boxes"][batch["valid"]]
  assert not batch["masks"][~batch["valid"]].any() and masks.any()
  for m, box in zip(masks, boxes * [wm, hm, wm, hm]):
    if m.any():
      assert_mask_in_box(m, box, "training mask", tight=False)


TFDS_LABELS = [0, 80, 2]  # TFDS coco/2017_panoptic labels: person (1), banner (92), car (3)


def panoptic_examples(n, offset):
  rng = np.random.default_rng(offset)
  for i in range(n):
    h, w = 36 + 4 * i, 48
    segment_ids = [1000 + i, 2000 + 256 * i, 3 + 65536]
    # The last image lacks its last segment: an object without pixels.
    present = segment_ids[:2] if i == n - 1 else segment_ids
    ids = id_map(rng, h, w, present)
    boxes = []
    for sid in segment_ids:
      x, y, bw, bh = bbox_of(ids == sid) if (ids == sid).any() else (1, 1, 4, 4)
      boxes.append([y / h, x / w, (y + bh) / h, (x + bw) / w])
    image = io.BytesIO()
    Image.new("RGB", (w, h), (30, 60, 90)).save(image, format="JPEG")
    png = io.BytesIO()
    input_pipeline.write_panoptic_png(png, ids)
    yield (
      {
        "image": image.getvalue(),
        "image/filename": f"{offset + i:012d}.jpg",
        "image/id": offset + i,
        "panoptic_image": png.getvalue(),
        "panoptic_image/filename": f"{offset + i:012d}.png",
        "panoptic_objects": {
          "area": np.asarray([(ids == s).sum() for s in segment_ids]),
          "bbox": np.asarray(boxes, np.float32),
          "id": np.asarray(segment_ids),
          "is_crowd": np.asarray([False, False, False]),
          "label": np.asarray(TFDS_LABELS),
        },
      },
      ids,
    )


def mock_panoptic(self, split, decoders=None, read_config=None, shuffle_files=False):
  """`as_dataset` of coco/2017_panoptic: 4 train and 3 validation examples, the image and the
  panoptic PNG left encoded."""
  del self, read_config, shuffle_files
  assert decoders is not None and {"image", "panoptic_image"} <= set(decoders)
  n, offset = (4, 100) if "train" in str(split) else (3, 500)
  spec = {
    "image": tf.TensorSpec([], tf.string),
    "image/filename": tf.TensorSpec([], tf.string),
    "image/id": tf.TensorSpec([], tf.int64),
    "panoptic_image": tf.TensorSpec([], tf.string),
    "panoptic_image/filename": tf.TensorSpec([], tf.string),
    "panoptic_objects": {
      "area": tf.TensorSpec([None], tf.int64),
      "bbox": tf.TensorSpec([None, 4], tf.float32),
      "id": tf.TensorSpec([None], tf.int64),
      "is_crowd": tf.TensorSpec([None], tf.bool),
      "label": tf.TensorSpec([None], tf.int64),
    },
  }
  examples = lambda: (ex for ex, _ in panoptic_examples(n, offset))
  ds = tf.data.Dataset.from_generator(examples, output_signature=spec)
  return ds.apply(tf.data.experimental.assert_cardinality(n))


def test_tfds_coco_panoptic_labels_masks_and_ground_truth():
  cfg = base.get_data_config()
  cfg.update(name="coco_panoptic", masks=True, mask_stride=1, max_boxes=4, shuffle_buffer=4)
  maps = {500 + i: ids for i, (_, ids) in enumerate(panoptic_examples(3, 500))}
  with tfds.testing.mock_data(as_dataset_fn=mock_panoptic):
    info = input_pipeline.get_dataset_info(cfg)
    labels = input_pipeline.label_space(cfg)
    assert (labels.num_classes, info.num_classes) == (250, 250)
    np.testing.assert_array_equal(labels.is_thing, info.is_thing)
    assert info.class_names[92] == "banner" and info.class_names[200] == "rug-merged"
    assert info.is_thing[1] and not info.is_thing[92]
    assert len(labels.panoptic_categories()) == 133 == len(sources.coco_panoptic_categories())
    batches = input_pipeline.create_eval_iterator(
      cfg, image_size=(40, 48), global_batch_size=4, process_index=0, process_count=1
    )
    (b,) = list(batches)
    assert batches.counters["invalid_masks"] == 1  # the segment missing from the last PNG
    for i in np.flatnonzero(b["mask"]):
      iid = int(b["image_id"][i])
      ids, segment_ids = maps[iid], [1000 + iid - 500, 2000 + 256 * (iid - 500), 3 + 65536]
      kept = [s for s in segment_ids if (ids == s).any()]
      assert b["labels"][i][b["valid"][i]].tolist() == [1, 92, 3][: len(kept)]
      for t, sid in enumerate(kept):
        np.testing.assert_array_equal(b["masks"][i, t], area_oracle(ids == sid, (40, 48)))
    gt = info.panoptic_gt
    assert len(info.coco_gt["images"]) == 3 and len(info.coco_gt["annotations"]) == 9
    assert len({a["id"] for a in info.coco_gt["annotations"]}) == 9
    for iid, ids in maps.items():
      np.testing.assert_array_equal(gt.id_map(iid), ids)
      assert [s["category_id"] for s in gt.segments_info(iid)] == [1, 92, 3]
    it = input_pipeline.create_train_iterator(
      cfg, image_size=(40, 48), global_batch_size=2, seed=0, process_index=0, process_count=1
    )
    batch = next(it)
    assert batch["masks"].shape == (2, 4, 40, 48)
    assert_masks_in_boxes(batch)


def test_tfds_coco_panoptic_contiguous_labels_without_masks():
  cfg = base.get_data_config()
  cfg.update(name="coco_panoptic", coco_category_ids_as_labels=False, max_boxes=4)
  with tfds.testing.mock_data(as_dataset_fn=mock_panoptic):
    info = input_pipeline.get_dataset_info(cfg)
    assert info.num_classes == 133 and info.class_names[80] == "banner"
    assert info.is_thing[:80].all() and not info.is_thing[80:].any()
    (b,) = list(
      input_pipeline.create_eval_iterator(
        cfg, image_size=(40, 48), global_batch_size=4, process_index=0, process_count=1
      )
    )
    assert "masks" not in b
    assert b["labels"][0][:3].tolist() == TFDS_LABELS
    assert info.panoptic_gt.segments_info(500)[1]["category_id"] == 92
