"""COCO panoptic format, PQ against a literal panopticapi-style oracle, and DETR's panoptic
post-processing on hand-built inputs."""

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from detr_jax import panoptic

OFFSET = 256**3
THINGS = (1, 2, 3, 4)  # 4 is only ever predicted: a class with false positives only
STUFF = (10, 11, 12, 13)  # 13 never appears: excluded from every average
CATEGORIES = [{"id": c, "name": f"thing{c}", "isthing": 1} for c in THINGS] + [
  {"id": c, "name": f"stuff{c}", "isthing": 0} for c in STUFF
]


# ---------------------------------------------------------------------------------------------
# Oracle: panopticapi's pq_compute_single_core and pq_average, followed literally
# ---------------------------------------------------------------------------------------------


def _oracle_image(pq_stat, gt_ids, gt_segments, pred_ids, pred_segments):
  """Adds one image's counts to pq_stat {cat: [tp, fp, fn, iou]}; returns #ignored preds."""
  gt_segms = {el["id"]: dict(el) for el in gt_segments}
  pred_segms = {el["id"]: dict(el) for el in pred_segments}
  labels, labels_cnt = np.unique(pred_ids, return_counts=True)
  for label, label_cnt in zip(labels.tolist(), labels_cnt.tolist()):
    if label in pred_segms:
      pred_segms[label]["area"] = label_cnt

  pan_gt_pred = gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64)
  gt_pred_map = {}
  labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
  for label, intersection in zip(labels.tolist(), labels_cnt.tolist()):
    gt_pred_map[(label // OFFSET, label % OFFSET)] = intersection

  gt_matched, pred_matched = set(), set()
  for (gt_label, pred_label), intersection in gt_pred_map.items():
    if gt_label not in gt_segms or pred_label not in pred_segms:
      continue
    if gt_segms[gt_label]["iscrowd"] == 1:
      continue
    if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
      continue
    union = (
      pred_segms[pred_label]["area"]
      + gt_segms[gt_label]["area"]
      - intersection
      - gt_pred_map.get((0, pred_label), 0)
    )
    iou = intersection / union
    if iou > 0.5:
      pq_stat[gt_segms[gt_label]["category_id"]][0] += 1
      pq_stat[gt_segms[gt_label]["category_id"]][3] += iou
      gt_matched.add(gt_label)
      pred_matched.add(pred_label)

  crowd_labels_dict = {}
  for gt_label, gt_info in gt_segms.items():
    if gt_label in gt_matched:
      continue
    if gt_info["iscrowd"] == 1:
      crowd_labels_dict[gt_info["category_id"]] = gt_label
      continue
    pq_stat[gt_info["category_id"]][2] += 1

  ignored = 0
  for pred_label, pred_info in pred_segms.items():
    if pred_label in pred_matched:
      continue
    intersection = gt_pred_map.get((0, pred_label), 0)
    if pred_info["category_id"] in crowd_labels_dict:
      intersection += gt_pred_map.get((crowd_labels_dict[pred_info["category_id"]], pred_label), 0)
    if intersection / pred_info["area"] > 0.5:
      ignored += 1
      continue
    pq_stat[pred_info["category_id"]][1] += 1
  return ignored


def _oracle_average(pq_stat, categories, isthing):
  pq, sq, rq, n = 0, 0, 0, 0
  per_class = {}
  for label, info in categories.items():
    if isthing is not None and isthing != (info["isthing"] == 1):
      continue
    tp, fp, fn, iou = pq_stat[label]
    if tp + fp + fn == 0:
      per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
      continue
    n += 1
    pq_class = iou / (tp + 0.5 * fp + 0.5 * fn)
    sq_class = iou / tp if tp != 0 else 0
    rq_class = tp / (tp + 0.5 * fp + 0.5 * fn)
    per_class[label] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
    pq, sq, rq = pq + pq_class, sq + sq_class, rq + rq_class
  return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def _oracle(images, categories):
  pq_stat = defaultdict(lambda: [0, 0, 0, 0.0])
  ignored = sum(_oracle_image(pq_stat, *image[1:]) for image in images)
  cats = {c["id"]: c for c in categories}
  results = {}
  for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
    results[name], per_class = _oracle_average(pq_stat, cats, isthing)
    if name == "All":
      results["per_class"] = per_class
  return results, pq_stat, ignored


def _assert_results_close(got, want, tol=1e-9):
  for name in ("All", "Things", "Stuff"):
    assert got[name]["n"] == want[name]["n"], name
    for key in ("pq", "sq", "rq"):
      assert got[name][key] == pytest.approx(want[name][key], abs=tol), (name, key)
  assert got["per_class"].keys() == want["per_class"].keys()
  for c, v in want["per_class"].items():
    for key in ("pq", "sq", "rq"):
      assert got["per_class"][c][key] == pytest.approx(v[key], abs=tol), (c, key)


# ---------------------------------------------------------------------------------------------
# Random ground truth and predictions
# ---------------------------------------------------------------------------------------------


def _rect(rng, h, w, max_size):
  y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
  hh, ww = rng.integers(2, max_size + 1, 2)
  return slice(y, y + hh), slice(x, x + ww)


def _segments(rng, ids_map, cat_of, crowd_of=None):
  """segments_info of the ids present, in random order."""
  labels, counts = np.unique(ids_map, return_counts=True)
  segs = []
  for label, count in zip(labels.tolist(), counts.tolist()):
    if label == 0:
      continue
    seg = {"id": label, "category_id": cat_of[label], "area": count}
    if crowd_of is not None:
      seg["iscrowd"] = int(crowd_of[label])
    segs.append(seg)
  return [segs[i] for i in rng.permutation(len(segs))]


def _random_image(rng, h=20, w=28):
  """(gt_ids, gt_segments, pred_ids, pred_segments) with stuff bands, things, crowd regions,
  VOID, shifted / split / relabeled / missing predictions and spurious ones."""
  new_ids = iter(rng.choice(OFFSET - 1, size=64, replace=False) + 1)
  gt = np.zeros((h, w), np.int64)
  cat_of, crowd_of = {}, {}
  cuts = np.sort(rng.choice(np.arange(2, h - 1), size=2, replace=False))
  for a, b in zip([0, *cuts], [*cuts, h]):
    i = int(next(new_ids))
    gt[a:b] = i
    cat_of[i], crowd_of[i] = int(rng.choice(STUFF[:3])), False
  for _ in range(rng.integers(2, 7)):
    i = int(next(new_ids))
    gt[_rect(rng, h, w, 10)] = i
    cat_of[i], crowd_of[i] = int(rng.choice(THINGS[:3])), rng.random() < 0.25
  gt[_rect(rng, h, w, 6)] = 0
  gt[rng.random((h, w)) < 0.05] = 0

  shifted = np.roll(gt, rng.integers(-1, 2, 2), axis=(0, 1))
  pred = np.zeros_like(gt)
  pred_cat = {}
  cols = np.arange(w)[None, :]
  for g in np.unique(gt[gt > 0]).tolist():
    if rng.random() < 0.15:
      continue  # missed
    cat = cat_of[g] if rng.random() > 0.15 else int(rng.choice(THINGS[:3] + STUFF[:3]))
    mask = shifted == g
    parts = [mask]
    if rng.random() < 0.2:  # two parts cut at random columns (they may overlap or leave a gap)
      parts = [mask & (cols < rng.integers(0, w)), mask & (cols >= rng.integers(0, w))]
    for part in parts:
      i = int(next(new_ids))
      pred[part] = i
      pred_cat[i] = cat
  spurious = rng.choice(THINGS + STUFF[:3], size=rng.integers(0, 3)).tolist()
  for cat in spurious + [4] * (rng.random() < 0.3):
    i = int(next(new_ids))
    pred[_rect(rng, h, w, 7)] = i
    pred_cat[i] = cat
  noise = rng.random((h, w)) < 0.03
  pred_labels = np.unique(pred)
  pred[noise] = rng.choice(pred_labels, size=int(noise.sum()))

  gt_segments = _segments(rng, gt, cat_of, crowd_of)
  pred_segments = [
    {"id": s["id"], "category_id": s["category_id"]} for s in _segments(rng, pred, pred_cat)
  ]
  return gt, gt_segments, pred, pred_segments


def _dataset(seed, num_images):
  rng = np.random.default_rng(seed)
  return [(100 + i, *_random_image(rng)) for i in range(num_images)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pq_matches_panopticapi_oracle_on_random_images(seed):
  images = _dataset(seed, 15)
  want, stat, ignored = _oracle(images, CATEGORIES)
  got = panoptic.pq_from_segments(images, CATEGORIES)
  _assert_results_close(got, want)
  # The data exercise every rule: matches, misses, spurious and ignored predictions, a class
  # with false positives only, a class that never appears.
  assert sum(s[0] for s in stat.values()) > 0 and sum(s[2] for s in stat.values()) > 0
  assert ignored > 0
  assert stat[4][0] == 0 and stat[4][1] > 0 and got["per_class"][4]["pq"] == 0.0
  assert stat[13] == [0, 0, 0, 0.0] and got["per_class"][13] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
  assert 0 < got["All"]["pq"] < 1 and got["Things"]["n"] + got["Stuff"]["n"] == got["All"]["n"]


def test_pq_compute_reads_coco_panoptic_files(tmp_path):
  images = _dataset(3, 6)
  gt_json = {"annotations": [], "categories": CATEGORIES}
  pred_json = {"annotations": []}
  for folder in ("gt", "pred"):
    (tmp_path / folder).mkdir()
  for image_id, gt, gt_segs, pred, pred_segs in images:
    name = f"{image_id:012d}.png"
    panoptic.write_panoptic_png(tmp_path / "gt" / name, gt)
    panoptic.write_panoptic_png(tmp_path / "pred" / name, pred)
    gt_json["annotations"].append(
      {"image_id": image_id, "file_name": name, "segments_info": gt_segs}
    )
    pred_json["annotations"].append(
      {"image_id": image_id, "file_name": name, "segments_info": pred_segs}
    )
  (tmp_path / "gt.json").write_text(json.dumps(gt_json))
  (tmp_path / "pred.json").write_text(json.dumps(pred_json))
  got = panoptic.pq_compute(
    str(tmp_path / "gt.json"), tmp_path / "pred.json", tmp_path / "gt", tmp_path / "pred"
  )
  _assert_results_close(got, _oracle(images, CATEGORIES)[0])

  ids, segs = panoptic.load_panoptic(tmp_path / "gt", gt_json["annotations"][0])
  np.testing.assert_array_equal(ids, images[0][1])
  assert segs == {s["id"]: s for s in images[0][2]}

  pred_json["annotations"].pop()
  with pytest.raises(ValueError, match=rf"no prediction for the images with ids \[{105}\]"):
    panoptic.pq_compute(gt_json, pred_json, tmp_path / "gt", tmp_path / "pred")


# ---------------------------------------------------------------------------------------------
# Hand-computed cases (1 x N images)
# ---------------------------------------------------------------------------------------------

CATS_AB = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}]


def _row(values):
  return np.array([values], np.int64)


def test_pq_void_is_left_out_of_the_union():
  # gt:   1 1 1 1 0 0 2 2 2 2   (1: thing cat 1, area 4; 2: stuff cat 2, area 4; 0: VOID)
  # pred: 5 5 5 5 5 5 7 7 8 8   (5: cat 1; 7, 8: cat 2)
  # (1, 5): union = 6 + 4 - 4 - 2 (pred on VOID) = 4 -> IoU 1 (4/6 if VOID counted): TP.
  # (2, 7), (2, 8): union = 2 + 4 - 2 = 4 -> IoU 0.5, not > 0.5: gt 2 is a FN, 7 and 8 FPs.
  # cat 1: PQ = SQ = RQ = 1. cat 2: tp 0, fp 2, fn 1 -> PQ = SQ = RQ = 0.
  # All: means 0.5 over n = 2; Things 1 (n 1); Stuff 0 (n 1).
  gt_segs = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 2, "iscrowd": 0}]
  pred_segs = [{"id": i, "category_id": c} for i, c in ((5, 1), (7, 2), (8, 2))]
  images = [
    (1, _row([1, 1, 1, 1, 0, 0, 2, 2, 2, 2]), gt_segs, _row([5] * 6 + [7, 7, 8, 8]), pred_segs)
  ]
  r = panoptic.pq_from_segments(images, CATS_AB)  # gt areas counted (no "area" field)
  assert r["All"] == {"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2}
  assert r["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
  assert r["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}
  stats = panoptic.pq_image_stats(*images[0][1:], CATS_AB)
  np.testing.assert_array_equal(stats, [[1, 0, 0, 1.0], [0, 2, 1, 0.0]])
  # As panopticapi, a JSON `area` wins over the pixel count: with area 8 for gt 1, (1, 5) has
  # union 6 + 8 - 4 - 2 = 8 and IoU 0.5, not a match: gt 1 is a FN and pred 5 a FP.
  gt_segs[0]["area"] = 8
  stats = panoptic.pq_image_stats(*images[0][1:], CATS_AB)
  np.testing.assert_array_equal(stats, [[0, 1, 1, 0.0], [0, 2, 1, 0.0]])


def test_pq_crowd_regions():
  # Image A. gt:   3 3 3 3 3 9 9 9 9 0  (3: cat 1, area 5; 9: cat 1 crowd, area 4)
  #          pred: 4 4 4 4 4 6 6 6 6 6  (4, 6: cat 1)
  # (3, 4): IoU 5/5 = 1 -> TP. The crowd gt is never matched nor a FN. Pred 6 lies on
  # VOID (1) + crowd (4) = 5 of its 5 pixels > half -> not a FP. cat 1: tp 1, iou 1.
  # Image B. gt:   9 9 1 1 1 1 1 1      (9: cat 1 crowd, area 2; 1: cat 1, area 6)
  #          pred: 6 6 6 6 5 5 5 5      (6, 5: cat 1)
  # (1, 6): IoU 2 / (4 + 6 - 2) = 0.25. (1, 5): IoU 4 / (4 + 6 - 4) = 2/3 -> TP.
  # Pred 6: crowd overlap 2 of 4 = 0.5, not > 0.5 -> FP. cat 1: tp 1, fp 1, iou 2/3.
  # B alone: PQ = (2/3) / 1.5 = 4/9, SQ = 2/3, RQ = 1 / 1.5 = 2/3.
  # A + B: tp 2, fp 1, iou 5/3: PQ = (5/3) / 2.5 = 2/3, SQ = 5/6, RQ = 2 / 2.5 = 0.8.
  seg = lambda i, crowd, area: {"id": i, "category_id": 1, "iscrowd": crowd, "area": area}
  pred_seg = lambda i: {"id": i, "category_id": 1}
  a = (
    "A",
    _row([3, 3, 3, 3, 3, 9, 9, 9, 9, 0]),
    [seg(3, 0, 5), seg(9, 1, 4)],
    _row([4, 4, 4, 4, 4, 6, 6, 6, 6, 6]),
    [pred_seg(4), pred_seg(6)],
  )
  b = (
    "B",
    _row([9, 9, 1, 1, 1, 1, 1, 1]),
    [seg(9, 1, 2), seg(1, 0, 6)],
    _row([6, 6, 6, 6, 5, 5, 5, 5]),
    [pred_seg(6), pred_seg(5)],
  )
  r = panoptic.pq_from_segments([a], CATS_AB)
  assert r["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
  assert r["Stuff"]["n"] == 0 and r["All"]["n"] == 1  # cat 2 absent: not averaged
  r = panoptic.pq_from_segments([b], CATS_AB)
  assert r["All"]["pq"] == pytest.approx(4 / 9) and r["All"]["sq"] == pytest.approx(2 / 3)
  assert r["All"]["rq"] == pytest.approx(2 / 3)
  r = panoptic.pq_from_segments([a, b], CATS_AB)
  assert r["per_class"][1] == pytest.approx({"pq": 2 / 3, "sq": 5 / 6, "rq": 0.8})
  assert r["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


def test_pq_input_errors_name_image_and_segment():
  gt = _row([1, 1, 1, 1])
  gt_segs = [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 4}]
  with pytest.raises(ValueError, match="image 7: segment 3 is in the PNG but not in segments_info"):
    panoptic.pq_image_stats(gt, gt_segs, _row([3, 0, 0, 0]), [], CATS_AB, image_id=7)
  with pytest.raises(ValueError, match=r"image 7: segments \[8\] are in segments_info but not"):
    segs = [{"id": 3, "category_id": 1}, {"id": 8, "category_id": 1}]
    panoptic.pq_image_stats(gt, gt_segs, _row([3, 3, 0, 0]), segs, CATS_AB, image_id=7)
  with pytest.raises(ValueError, match="image 7: predicted segment 3 has unknown category_id 99"):
    segs = [{"id": 3, "category_id": 99}]
    panoptic.pq_image_stats(gt, gt_segs, _row([3, 3, 0, 0]), segs, CATS_AB, image_id=7)
  with pytest.raises(ValueError, match="image 7: ground-truth segment 1 has unknown category_id 5"):
    gt_bad = [{"id": 1, "category_id": 5, "iscrowd": 0}]
    panoptic.pq_image_stats(gt, gt_bad, _row([0, 0, 0, 0]), [], CATS_AB, image_id=7)
  with pytest.raises(ValueError, match="image 7: ground-truth segment id 0 is VOID"):
    gt_bad = [{"id": 0, "category_id": 1, "iscrowd": 0}]
    panoptic.pq_image_stats(gt, gt_bad, _row([0, 0, 0, 0]), [], CATS_AB, image_id=7)
  # VOID (0) in the predicted PNG needs no segment.
  stats = panoptic.pq_image_stats(gt, gt_segs, _row([0, 0, 0, 0]), [], CATS_AB)
  np.testing.assert_array_equal(stats, [[0, 0, 1, 0], [0, 0, 0, 0]])


def test_rgb2id_id2rgb_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, OFFSET, (5, 7))
  rgb = panoptic.id2rgb(ids)
  assert rgb.dtype == np.uint8 and rgb.shape == (5, 7, 3)
  np.testing.assert_array_equal(panoptic.rgb2id(rgb), ids)
  np.testing.assert_array_equal(panoptic.id2rgb(1 + 2 * 256 + 3 * 65536), [1, 2, 3])
  assert panoptic.rgb2id([255, 255, 255]) == OFFSET - 1
  panoptic.write_panoptic_png(tmp_path / "a.png", ids)
  np.testing.assert_array_equal(panoptic.read_panoptic_png(tmp_path / "a.png"), ids)
  with pytest.raises(ValueError, match="segment ids"):
    panoptic.id2rgb([OFFSET])


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


def _torch_bilinear(x, size):
  return torch.nn.functional.interpolate(
    torch.from_numpy(x)[None], size=size, mode="bilinear", align_corners=False
  )[0].numpy()


@pytest.mark.parametrize("n_in,n_out", [(51, 803), (5, 7), (7, 3), (256, 1024)])
def test_resize_bilinear_samples_and_weights_are_torchs(n_in, n_out):
  # Interpolating one-hot rows gives each output's two source indices and weights, exactly.
  eye = np.eye(n_in, dtype=np.float32)
  along_w = panoptic.resize_bilinear(eye[:, None, :], (1, n_out))
  np.testing.assert_array_equal(along_w, _torch_bilinear(eye[:, None, :], (1, n_out)))
  along_h = panoptic.resize_bilinear(eye[:, :, None], (n_out, 1))
  np.testing.assert_array_equal(along_h, _torch_bilinear(eye[:, :, None], (n_out, 1)))


@pytest.mark.parametrize(
  "in_size,size", [((5, 7), (20, 28)), ((5, 7), (3, 4)), ((37, 51), (600, 803))]
)
def test_resize_bilinear_matches_torch(in_size, size):
  # Values agree to a few float32 ulps (|x| < 64; torch fuses its multiply-adds in its own order).
  x = np.random.default_rng(0).normal(size=(3, *in_size)).astype(np.float32) * 10
  got = panoptic.resize_bilinear(x, size)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, _torch_bilinear(x, size), rtol=0, atol=1e-5)


def test_resize_nearest():
  ids = np.arange(12).reshape(3, 4)
  np.testing.assert_array_equal(panoptic.resize_nearest(ids, (6, 8)), ids.repeat(2, 0).repeat(2, 1))
  # Downscaling 3 x 4 -> 2 x 3: source floor((i + 0.5) * in / out): rows 0, 2; columns 0, 2, 3.
  np.testing.assert_array_equal(panoptic.resize_nearest(ids, (2, 3)), [[0, 2, 3], [8, 10, 11]])
  # The same as the reference's resize of the RGB-encoded id image.
  ids = np.random.default_rng(0).integers(0, 100, (64, 48))
  rgb = Image.fromarray(panoptic.id2rgb(ids)).resize((17, 30), resample=Image.Resampling.NEAREST)
  np.testing.assert_array_equal(panoptic.resize_nearest(ids, (30, 17)), panoptic.rgb2id(rgb))


# K = 3 labels: 0 a thing (category 5), 1 and 2 stuff (categories 20, 30); no-object = 3.
IS_THING = [True, False, False]
CATEGORY = [5, 20, 30]


def _logits(rows):
  """Class logits [Q, 4]: each row is the label (3 = no object) and its logit; others 0."""
  out = np.zeros((len(rows), 4), np.float32)
  for q, (label, value) in enumerate(rows):
    out[q, label] = value
  return out


def _hand_masks(thing_below):
  """8 x 8 mask logits of six queries: q0 (thing) wins the top-left quarter, q1 (stuff 1) the
  top-right one, q3 (stuff 1 again) the bottom half except pixel (7, 0), won by q5 (thing).
  q2 and q4 (not kept) are 10 everywhere. In the bottom half q0 is `thing_below`, q1 is -1."""
  m = np.full((6, 8, 8), -5.0, np.float32)
  m[0, :4, :4] = 5
  m[0, 4:] = thing_below
  m[1] = -1
  m[1, :4, 4:] = 4
  m[2] = m[4] = 10
  m[3, 4:] = 4
  m[5] = -9
  m[5, 7, 0] = 9
  return m


# q0: label 0, q1: label 1, q2: no object, q3: label 1, q4: label 2 with probability
# e^2 / (e^2 + 3) = 0.71 < 0.85, q5: label 0. Kept: q0, q1, q3, q5 (indices 0..3).
HAND_LOGITS = _logits([(0, 8), (1, 8), (3, 8), (1, 8), (2, 2), (0, 8)])


def test_postprocess_panoptic_stuff_merge_and_tiny_segment():
  # First pass (masks at 8 x 8, the model's size; then 2x nearest to 16 x 16): ids 0 top-left,
  # 1 top-right, 2 bottom but (7, 0) = 3; stuff merge: 2 -> 1. Areas 64, 188, 0, 4: the
  # merged-away query 2 (0) and query 3 (4 <= 4) go. Second pass over q0, q1: the bottom half
  # goes to q1 (-1 > -5), so the two stuff-1 queries end up as one segment of area 192.
  ids, segs = panoptic.postprocess_panoptic(
    HAND_LOGITS, _hand_masks(-5.0), (8, 8), (16, 16), IS_THING, CATEGORY
  )
  want = np.ones((16, 16), np.int32)
  want[:8, :8] = 0
  np.testing.assert_array_equal(ids, want)
  assert segs == [
    {"id": 0, "category_id": 5, "isthing": True, "area": 64},
    {"id": 1, "category_id": 20, "isthing": False, "area": 192},
  ]
  # Predicted segment id 0 is a segment for PQ: scored against the same segmentation as
  # ground truth (ids + 1: ground-truth id 0 is VOID), it is perfect.
  gt_segs = [{**s, "id": s["id"] + 1, "iscrowd": 0} for s in segs]
  cats = [{"id": 5, "isthing": 1}, {"id": 20, "isthing": 0}]
  r = panoptic.pq_from_segments([(1, ids + 1, gt_segs, ids, segs)], cats)
  assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}


def test_postprocess_panoptic_redoes_argmax_after_dropping_merged_stuff():
  # As the reference: the merged-away stuff query is dropped for its area 0, and the second
  # argmax (without merging) gives its pixels to the best remaining query: here the thing q0
  # (0 > -1 of q1), not the other stuff query.
  ids, segs = panoptic.postprocess_panoptic(
    HAND_LOGITS, _hand_masks(0.0), (8, 8), (16, 16), IS_THING, CATEGORY
  )
  want = np.zeros((16, 16), np.int32)
  want[:8, 8:] = 1
  np.testing.assert_array_equal(ids, want)
  assert [(s["category_id"], s["area"]) for s in segs] == [(5, 192), (20, 64)]


def test_postprocess_panoptic_upsamples_masks_and_drops_areas_up_to_4():
  # 4 x 4 mask ramps along x, upsampled to 8 x 8 (bilinear, half-pixel centres): q1 = -q0 =
  # x - 1.5 at the source; upsampled, q0 wins the left 4 columns, q1 the right 4 (tie-free).
  ramp = np.broadcast_to(np.arange(4, dtype=np.float32) - 1.5, (4, 4))
  masks = np.stack([-ramp, ramp])
  logits = _logits([(0, 8), (2, 8)])
  ids, segs = panoptic.postprocess_panoptic(logits, masks, (8, 8), (8, 8), IS_THING, CATEGORY)
  np.testing.assert_array_equal(ids, np.repeat([[0] * 4 + [1] * 4], 8, 0))
  assert [(s["category_id"], s["isthing"], s["area"]) for s in segs] == [
    (5, True, 32),
    (30, False, 32),
  ]

  # Area 5 stays, area 4 goes (all its pixels then belong to the other query).
  masks = np.zeros((2, 4, 4), np.float32)
  masks[0] = -1
  masks[0].flat[:5] = 1
  _, segs = panoptic.postprocess_panoptic(logits, masks, (4, 4), (4, 4), IS_THING, CATEGORY)
  assert [s["area"] for s in segs] == [5, 11]
  masks[0].flat[4] = -1
  ids, segs = panoptic.postprocess_panoptic(logits, masks, (4, 4), (4, 4), IS_THING, CATEGORY)
  assert segs == [{"id": 0, "category_id": 30, "isthing": False, "area": 16}]
  np.testing.assert_array_equal(ids, np.zeros((4, 4)))


def test_postprocess_panoptic_without_kept_queries():
  # All queries below the threshold or no-object: the reference writes an all-zero PNG and no
  # segments.
  logits = _logits([(3, 8), (0, 1), (1, 0)])
  masks = np.zeros((3, 2, 2), np.float32)
  ids, segs = panoptic.postprocess_panoptic(logits, masks, (4, 4), (6, 5), IS_THING, CATEGORY)
  assert segs == [] and ids.shape == (6, 5) and not ids.any()
