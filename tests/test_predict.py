"""predict.py end to end on a briefly trained tiny model, and the attention-map helpers."""

import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from configs import tiny
from detr_jax import attention_maps, config_utils, prediction, trainer, visualize
from input_pipeline import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny DETR that trains a few steps in seconds; a non-square input gives a 2 x 3 grid. The
# model, input and schedule fields are tests/test_train.py's, so the two files compile the
# same training step and predict function once (the persistent cache of tests/conftest.py).
OVERRIDES = {
  "model.backbone": "resnet18",
  "model.hidden_dim": 32,
  "model.num_heads": 2,
  "model.dim_feedforward": 64,
  "model.num_encoder_layers": 1,
  "model.num_decoder_layers": 2,
  "model.num_queries": 8,
  "image_size": (64, 96),
  "batch_size": 8,
  "eval_batch_size": 8,
  "data.synthetic_num_train": 64,
  "data.synthetic_num_eval": 6,
  "data.synthetic_image_size": (64, 64),
  "data.max_boxes": 8,
  "num_train_steps": 2,
  "checkpoint_every_steps": 2,
  "log_every_steps": 1,
  "eval_every_steps": 2,
  "num_eval_images_to_draw": 0,
}
GRID = (2, 3)
NUM_ATTENTION = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, config) of the tiny model after 2 training steps and an eval of 6 images."""
  config = tiny.get_config()
  config_utils.apply_overrides(config, [f"{k}={v!r}" for k, v in OVERRIDES.items()])
  workdir = str(tmp_path_factory.mktemp("trained"))
  trainer.train_and_evaluate(config, workdir)
  return workdir, config


def _synthetic_eval(config):
  return synthetic.generate_split(config.data, "eval")


def _write_inputs(directory, config):
  """Image files 1..6 (sizes differ, 6 is a grayscale TIFF) and two unreadable ones.

  Returns {image_id: (height, width, [(label, [x, y, w, h])...])}, the ground truth.
  """
  os.makedirs(directory)
  examples = _synthetic_eval(config)
  sizes = {5: (90, 150), 6: (100, 48)}  # (h, w) of the rescaled ones
  gt = {}
  for i, ex in enumerate(examples, start=1):
    h0, w0 = tuple(config.data.synthetic_image_size)
    if i <= 4:  # exactly the bytes the eval split decodes
      with open(os.path.join(directory, f"{i}.jpg"), "wb") as f:
        f.write(ex["jpeg"])
      h, w = h0, w0
    else:
      h, w = sizes[i]
      image = Image.open(io.BytesIO(ex["jpeg"])).resize((w, h), Image.BILINEAR)
      if i == 5:
        image.save(os.path.join(directory, "5.png"))
      else:  # a grayscale TIFF, a format that TensorFlow does not decode
        image.convert("L").save(os.path.join(directory, "6.tif"))
    s = np.array([w / w0, h / h0, w / w0, h / h0])
    objs = [(int(c), list(b * s)) for c, b in zip(ex["labels"], ex["boxes"])]
    gt[i] = (h, w, [(c, [x0, y0, x1 - x0, y1 - y0]) for c, (x0, y0, x1, y1) in objs])
  with open(os.path.join(directory, "7.jpg"), "wb") as f:
    f.write(b"this is not a JPEG")
  png = io.BytesIO()
  Image.new("RGB", (40, 30), (9, 9, 9)).save(png, format="PNG")
  with open(os.path.join(directory, "8.png"), "wb") as f:
    f.write(png.getvalue()[:60])  # truncated
  return gt


def _coco_gt(gt, class_names, label_to_category_id):
  images, anns = [], []
  for iid, (h, w, objs) in gt.items():
    images.append(dict(id=iid, width=w, height=h, file_name=f"{iid}"))
    for c, box in objs:
      anns.append(
        dict(
          id=len(anns) + 1,
          image_id=iid,
          category_id=int(label_to_category_id[c]),
          bbox=box,
          area=box[2] * box[3],
          iscrowd=0,
        )
      )
  cats = [dict(id=int(c), name=n) for c, n in zip(label_to_category_id, class_names)]
  coco = COCO()
  coco.dataset = dict(images=images, annotations=anns, categories=cats)
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _edge_matches(png, xyxy, color):
  """Whether the left, right and bottom edges of a 2-pixel box outline drawn at `xyxy` have
  `color` (PIL draws a float box from the truncated coordinates; the top edge is under the
  label)."""
  x0, y0, x1, y1 = xyxy
  c0, c1, r1 = round(x0), round(x1) - 1, round(y1) - 1
  rows = np.arange(max(round(y0), 12) + 2, r1 - 1)
  cols = np.arange(c0 + 3, c1 - 2)
  strips = [png[rows, c0], png[rows, c1], png[r1, cols]]
  return all(len(s) >= 4 and np.all(s == color) for s in strips)


def test_predict_cli_json_drawings_attention_and_corrupt_files(trained, tmp_path):
  workdir, config = trained
  inputs, out = str(tmp_path / "inputs"), str(tmp_path / "out")
  gt = _write_inputs(inputs, config)
  proc = subprocess.run(
    [
      sys.executable,
      "predict.py",
      f"--workdir={workdir}",
      f"--images={inputs}",
      f"--output={out}",
      "--score_threshold=0",
      "--batch_size=4",
      "--attention",
      f"--num_attention={NUM_ATTENTION}",
    ],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  for bad in ("7.jpg", "8.png"):
    assert f"Skipping {os.path.join(inputs, bad)}" in proc.stderr

  # The JSON: every query of the 6 readable images (threshold 0), valid COCO results.
  import input_pipeline

  info = input_pipeline.get_dataset_info(config.data)
  results = json.load(open(os.path.join(out, prediction.DETECTIONS_FILE)))
  q = config.model.num_queries
  assert sorted({r["image_id"] for r in results}) == [1, 2, 3, 4, 5, 6]
  assert len(results) == 6 * q
  names = dict(zip(info.label_to_category_id.tolist(), info.class_names))
  for r in results:
    assert r["category_name"] == names[r["category_id"]]
    ext = {5: "png", 6: "tif"}.get(r["image_id"], "jpg")
    assert r["file_name"] == f"{r['image_id']}.{ext}"
  coco = _coco_gt(gt, info.class_names, info.label_to_category_id)
  with contextlib.redirect_stdout(io.StringIO()):
    ev = COCOeval(coco, coco.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  assert np.all(np.isfinite(ev.stats))

  # Images 1..4 are the eval split's files: same detections as the training run's eval.
  (eval_json,) = [f for f in os.listdir(os.path.join(workdir, "eval")) if "detections" in f]
  reference = json.load(open(os.path.join(workdir, "eval", eval_json)))
  for iid in range(1, 5):
    got = sorted((r for r in results if r["image_id"] == iid), key=lambda r: -r["score"])
    want = sorted((r for r in reference if r["image_id"] == iid), key=lambda r: -r["score"])
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-4)
    np.testing.assert_allclose([r["bbox"] for r in got], [r["bbox"] for r in want], atol=0.02)

  # Drawings: original sizes; the box drawn last (lowest score) lies where the JSON says.
  label_of = {int(c): k for k, c in enumerate(info.label_to_category_id)}
  checked = 0
  for iid, (h, w, _) in gt.items():
    png = np.asarray(Image.open(os.path.join(out, prediction.IMAGES_DIR, f"{iid}.png")))
    assert png.shape == (h, w, 3)
    last = min((r for r in results if r["image_id"] == iid), key=lambda r: r["score"])
    x, y, bw, bh = last["bbox"]
    if x >= 0 and y >= 0 and x + bw <= w - 1 and y + bh <= h - 1 and bw >= 12 and bh >= 20:
      color = visualize.label_color(label_of[last["category_id"]])
      assert _edge_matches(png, (x, y, x + bw, y + bh), color), (iid, last)
      checked += 1
  assert checked >= 2

  # Attention: a panel per image; each map sums to 1 over the 2 x 3 grid before upsampling.
  tile = 256
  for iid, (h, w, _) in gt.items():
    maps = np.load(os.path.join(out, prediction.ATTENTION_DIR, f"{iid}.npz"))
    k = len(maps["queries"])
    assert 1 <= k <= NUM_ATTENTION
    for name in ("decoder", "encoder"):
      assert maps[name].shape == (k, *GRID)
      np.testing.assert_allclose(maps[name].sum(axis=(1, 2)), 1.0, atol=1e-5)
    panel = Image.open(os.path.join(out, prediction.ATTENTION_DIR, f"{iid}.png"))
    tw = round(w * tile / max(h, w))
    assert panel.size[0] == (k + 1) * (tw + 4) - 4


def test_select_maps_picks_top_queries_and_center_cells():
  rng = np.random.default_rng(0)
  b, q, (h, w) = 2, 5, GRID
  n = h * w
  dec = rng.dirichlet(np.ones(n), size=(b, q)).astype(np.float32)
  enc = rng.dirichlet(np.ones(n), size=(b, n)).astype(np.float32)
  inter = {
    "transformer": {
      "decoder_layer0": {"multihead_attn": {"attention_weights": (np.zeros_like(dec),)}},
      "decoder_layer1": {"multihead_attn": {"attention_weights": (dec,)}},
      "encoder_layer0": {"self_attn": {"attention_weights": (enc,)}},
    }
  }
  scores = rng.uniform(size=(b, q)).astype(np.float32)
  boxes = rng.uniform(0.05, 0.95, size=(b, q, 4)).astype(np.float32)
  queries = np.broadcast_to(np.arange(q, dtype=np.int32), (b, q))
  select = jax.jit(lambda *a: attention_maps.select_maps(*a, GRID, 3))
  out = select(inter, scores, boxes, queries)
  for i in range(b):
    top = np.argsort(-scores[i])[:3]
    np.testing.assert_array_equal(out["detections"][i], top)
    np.testing.assert_array_equal(out["queries"][i], top)
    for j, qi in enumerate(top):
      np.testing.assert_allclose(out["decoder"][i, j], dec[i, qi].reshape(h, w))
      row, col = int(boxes[i, qi, 1] * h), int(boxes[i, qi, 0] * w)
      np.testing.assert_array_equal(out["cells"][i, j], [row, col])
      np.testing.assert_allclose(out["encoder"][i, j], enc[i, row * w + col].reshape(h, w))


def test_overlay_puts_the_heat_where_the_map_is():
  image = np.full((60, 90, 3), 128, np.uint8)
  grid = np.zeros(GRID, np.float32)
  grid[1, 2] = 1.0  # bottom-right cell
  out = attention_maps.overlay(image, grid).astype(int).sum(-1)
  assert out[45, 75] > out[15, 15] + 100
  assert out[45, 75] == out.max()


def test_list_images_and_ids(tmp_path):
  for name in ("b.png", "a.JPG", "notes.txt", "sub/c.png"):
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  paths = prediction.list_images([str(tmp_path)])
  assert [os.path.basename(p) for p in paths] == ["a.JPG", "b.png"]
  paths = prediction.list_images([str(tmp_path / "*.png"), str(tmp_path / "sub" / "c.png")])
  assert [os.path.basename(p) for p in paths] == ["b.png", "c.png"]
  assert prediction.image_ids(["x/000000000139.jpg", "y/7.png"]) == [139, 7]
  assert prediction.image_ids(["x/1.jpg", "y/001.png"]) == [1, 2]
  assert prediction.image_ids(["a.jpg", "7.png"]) == [1, 2]
  with pytest.raises(FileNotFoundError, match="nothing"):
    prediction.list_images([str(tmp_path / "nothing*.jpg")])


def test_predict_with_a_masks_model_writes_instance_masks_and_panoptic_pngs(tmp_path):
  """A masks model on image files: instance mode (masks/STEM.npz, RLEs in detections.json,
  masks drawn) and, on data with stuff classes, panoptic mode (panoptic/STEM.png +
  panoptic.json as the reference's panoptic post-processing gives them)."""
  from pycocotools import mask as mask_utils

  from detr_jax import checkpoint, models, panoptic, postprocess

  config = tiny.get_config("masks")
  config_utils.apply_overrides(
    config,
    [
      "model.hidden_dim=32",
      "model.num_heads=8",
      "model.dim_feedforward=32",
      "model.num_encoder_layers=1",
      "model.num_decoder_layers=1",
      "model.num_queries=6",
      "model.conv='xla'",
      "image_size=(64,64)",
    ],
  )
  model = models.build_model(config.model)
  variables = models.init_variables(model, jax.random.key(0))
  variables = jax.tree.map(np.array, variables)
  # Confident queries of class 0 (a thing) or 3 (stuff in the panoptic label space).
  head = variables["params"]["class_embed"]
  u = np.random.default_rng(0).normal(size=32).astype(np.float32)
  head["kernel"][:] = 0.0
  head["kernel"][:, 0], head["kernel"][:, 3] = 10 * u, -10 * u
  head["bias"][:] = -20.0
  head["bias"][0] = head["bias"][3] = 0.0
  images = tmp_path / "images"
  images.mkdir()
  for i, ex in enumerate(synthetic.generate_split(config.data, "eval")[:2], start=1):
    (images / f"{i}.jpg").write_bytes(ex["jpeg"])

  # Instance segmentation (the synthetic classes are all things).
  workdir = str(tmp_path / "instance")
  checkpoint.write_variables(workdir, variables, config)
  out = tmp_path / "instance_out"
  summary = prediction.predict_files(workdir, [str(images)], str(out), score_threshold=0.3)
  assert summary["num_images"] == 2
  dets = json.load(open(out / "detections.json"))
  assert dets and all("segmentation" in d for d in dets)
  saved = np.load(out / "masks" / "1.npz")
  assert saved["masks"].shape == (6, 256, 256) and saved["masks"].dtype == bool
  first = [d for d in dets if d["image_id"] == 1]
  best = int(np.argmax(saved["scores"]))
  top = max(first, key=lambda d: d["score"])
  assert top["score"] == pytest.approx(float(saved["scores"][best]))
  np.testing.assert_array_equal(mask_utils.decode(top["segmentation"]), saved["masks"][best])
  assert os.path.exists(out / "images" / "1.png")

  # Panoptic: the same weights on a 4-category panoptic label space (class 3 is stuff).
  categories = [
    {"id": c, "name": n, "isthing": int(c != 4)}
    for c, n in enumerate(["rectangle", "ellipse", "triangle", "sky"], start=1)
  ]
  pan_json = tmp_path / "panoptic.json"
  pan_json.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
  config.data.name = "coco_panoptic_folder"
  config.data.coco_category_ids_as_labels = False
  config.data.eval_annotations = str(pan_json)
  workdir = str(tmp_path / "panoptic_model")
  checkpoint.write_variables(workdir, variables, config)
  out = tmp_path / "panoptic_out"
  prediction.predict_files(workdir, [str(images)], str(out))
  written = json.load(open(out / "panoptic.json"))
  assert [c["id"] for c in written["categories"]] == [1, 2, 3, 4]
  (ann,) = [a for a in written["annotations"] if a["image_id"] == 1]
  ids = panoptic.read_panoptic_png(str(out / "panoptic" / ann["file_name"]))
  # The same post-processing straight from the model's outputs.
  image = np.asarray(Image.open(images / "1.jpg").convert("RGB"))
  pre = prediction.input_pipeline.preprocess_eval_image(image, (64, 64))
  det = jax.device_get(
    postprocess.make_predict_fn(model)(variables, pre[None], np.array([[256, 256]]))
  )
  expected, segments = panoptic.postprocess_panoptic(
    det["logits"][0], det["masks"][0], (64, 64), (256, 256), [True, True, True, False], [1, 2, 3, 4]
  )
  assert segments
  assert ann["segments_info"] == segments
  np.testing.assert_array_equal(ids, expected)
