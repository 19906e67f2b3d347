"""The README's fine-tuning recipe end to end: a "pretrained" workdir with 4 classes, fine-tuned
with train.py --config.init_from on a COCO-format folder with 3 classes, then predict."""

import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
from PIL import Image, ImageDraw

from configs import tiny
from detr_jax import checkpoint, config_utils, models, prediction

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny architecture of both models (only the class count differs).
MODEL = {
  "model.backbone": "resnet18",
  "model.hidden_dim": 32,
  "model.num_heads": 2,
  "model.dim_feedforward": 64,
  "model.num_encoder_layers": 1,
  "model.num_decoder_layers": 2,
  "model.num_queries": 8,
  "image_size": (64, 64),
}
# Category ids need not be contiguous: labels are 0..2 in sorted id order.
CATEGORIES = {
  3: ("square", (220, 40, 40)),
  7: ("disc", (40, 200, 60)),
  9: ("triangle", (50, 80, 230)),
}


def _write_coco_folder(root, split, num_images, seed):
  """Images of colored shapes and their COCO instances json; returns (json path, image dir)."""
  rng = np.random.default_rng(seed)
  image_dir = os.path.join(root, split)
  os.makedirs(image_dir)
  images, annotations = [], []
  for i in range(1, num_images + 1):
    h, w = int(rng.integers(56, 96)), int(rng.integers(56, 96))
    canvas = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(90, 160, 3)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 3))):
      cid = int(rng.choice(list(CATEGORIES)))
      s = int(rng.integers(16, 28))
      x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
      color = CATEGORIES[cid][1]
      if cid == 3:
        draw.rectangle([x0, y0, x0 + s - 1, y0 + s - 1], fill=color)
      elif cid == 7:
        draw.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=color)
      else:
        draw.polygon([(x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1), (x0 + s // 2, y0)], fill=color)
      annotations.append(
        dict(id=len(annotations) + 1, image_id=i, category_id=cid, bbox=[x0, y0, s, s], iscrowd=0)
      )
    name = f"{split}_{i:03d}.jpg"
    canvas.save(os.path.join(image_dir, name), quality=95)
    images.append(dict(id=i, file_name=name, width=w, height=h))
  categories = [dict(id=c, name=n) for c, (n, _) in CATEGORIES.items()]
  path = os.path.join(root, f"{split}.json")
  with open(path, "w") as f:
    json.dump(dict(images=images, annotations=annotations, categories=categories), f)
  return path, image_dir


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def test_finetune_from_pretrained_workdir_on_coco_folder(tmp_path):
  # A "pretrained" workdir: random variables of the tiny model with 4 classes (not
  # initialized by the model, which would take a compile).
  config = config_utils.apply_overrides(
    tiny.get_config(), [f"{k}={v!r}" for k, v in {**MODEL, "model.num_classes": 4}.items()]
  )
  model = models.build_model(config.model)
  abstract = models.abstract_variables(model)
  rng = np.random.default_rng(7)
  pretrained = {  # random values (finite outputs: small weights, positive BN variances)
    "params": jax.tree.map(
      lambda a: rng.normal(0, 0.02, a.shape).astype(a.dtype), abstract["params"]
    ),
    "batch_stats": jax.tree.map(
      lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), abstract["batch_stats"]
    ),
  }
  pre_dir = str(tmp_path / "pretrained")
  checkpoint.write_variables(pre_dir, pretrained, config)

  train_json, train_dir = _write_coco_folder(str(tmp_path / "data"), "train", 8, seed=1)
  eval_json, eval_dir = _write_coco_folder(str(tmp_path / "data"), "eval", 4, seed=2)

  # The README's command, on the tiny model; learning rate 0 keeps the weights as loaded.
  ft_dir = str(tmp_path / "finetuned")
  flags = {
    **MODEL,
    "init_from": pre_dir,
    "data.name": "coco_folder",
    "data.train_annotations": train_json,
    "data.train_images": train_dir,
    "data.eval_annotations": eval_json,
    "data.eval_images": eval_dir,
    "model.num_classes": 3,
    "learning_rate": 0.0,
    "batch_size": 4,
    "eval_batch_size": 4,
    "num_train_steps": 2,
    "checkpoint_every_steps": 2,
    "eval_every_steps": 0,  # predict below runs the model on the eval folder
    "log_every_steps": 1,
  }
  args = [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={ft_dir}"]
  args += [f"--config.{k}={v}" for k, v in flags.items()]
  proc = subprocess.run(
    args,
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"Initialized from {pre_dir} step 0" in proc.stderr

  # Everything but the class head is the pretrained model; the head has 3 + 1 outputs.
  ft_config = checkpoint.load_config(ft_dir)
  _, finetuned, step = checkpoint.restore_model(ft_dir, ft_config)
  assert step == 2 and ft_config.model.num_classes == 3
  pre, ft = _flat(pretrained), _flat(finetuned)
  assert set(pre) == set(ft)
  for name in pre:
    if "class_embed" in name:
      assert ft[name].shape[-1] == 4 and pre[name].shape[-1] == 5, name
    else:
      np.testing.assert_array_equal(ft[name], pre[name], err_msg=name)

  # predict.py's library names the new classes.
  out = str(tmp_path / "predictions")
  summary = prediction.predict_files(ft_dir, [eval_dir], out, score_threshold=0.0, batch_size=4)
  assert summary["num_images"] == 4 and not summary["skipped"]
  results = json.load(open(os.path.join(out, prediction.DETECTIONS_FILE)))
  assert len(results) == 4 * 8
  assert {(r["category_id"], r["category_name"]) for r in results} <= {
    (c, n) for c, (n, _) in CATEGORIES.items()
  }
