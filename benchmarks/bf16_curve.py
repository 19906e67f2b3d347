"""bfloat16 compute against float32: training-loss curves of the tiny config, same seed and data.

Trains `configs/tiny.py` twice through `trainer.train_and_evaluate` (float32, then
`model.dtype=bfloat16`: bfloat16 activations and matmuls, float32 parameters, optimizer and
loss), with the same seed, for `--steps` steps, and prints both loss curves (mean of each
`--window` steps) and, at the end, the COCO AP50 of both on the validation images.

  python benchmarks/bf16_curve.py --steps 600 --window 50

`--data plain` trains without TensorFlow (for machines without it, such as the GPU image of
docs/benchmarks.md): the same synthetic images, resized to the config's image size with PIL,
no augmentation, shuffled each epoch with NumPy, through the same model, loss, optimizer and
schedule as `train_and_evaluate`; it reports losses only (no COCO evaluation).

  python benchmarks/bf16_curve.py --data plain --steps 400 --window 50
"""

import argparse
import importlib.util
import io
import os
import tempfile
import time

import jax
import numpy as np
import train_step  # benchmarks/train_step.py: the same jitted step as the speed benchmark
from PIL import Image

from configs import tiny
from detr_jax import runtime

# input_pipeline.transforms' constants, repeated: --data plain runs without TensorFlow.
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def train(dtype, steps, workdir):
  """(step -> train loss, eval metrics, seconds) of one run."""
  config = tiny.get_config()
  config.model.dtype = dtype
  config.num_train_steps = steps
  config.log_every_steps = 1
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  from detr_jax import trainer  # needs TensorFlow (the input pipeline)

  t = time.time()
  result = trainer.train_and_evaluate(config, workdir)
  seconds = time.time() - t
  losses = trainer.read_scalars(workdir, "train/loss")
  return losses, result["eval"], seconds


def _synthetic_module():
  """input_pipeline/synthetic.py (NumPy + PIL only), without the package's TensorFlow import."""
  path = os.path.join(os.path.dirname(__file__), "..", "input_pipeline", "synthetic.py")
  spec = importlib.util.spec_from_file_location("synthetic", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def plain_dataset(config):
  """The synthetic training split as arrays: image float32 [N, H, W, 3] (ImageNet-normalized,
  resized to `config.image_size`), labels int32 [N, T], boxes float32 [N, T, 4] (cxcywh,
  normalized), valid bool [N, T] with T = config.data.max_boxes."""
  d = config.data
  examples = _synthetic_module().generate_split(d, "train")
  h, w = config.image_size
  src_h, src_w = d.synthetic_image_size
  n, t = len(examples), d.max_boxes
  out = {
    "image": np.zeros((n, h, w, 3), np.float32),
    "labels": np.zeros((n, t), np.int32),
    "boxes": np.zeros((n, t, 4), np.float32),
    "valid": np.zeros((n, t), bool),
  }
  for i, ex in enumerate(examples):
    image = Image.open(io.BytesIO(ex["jpeg"])).convert("RGB").resize((w, h), Image.BILINEAR)
    out["image"][i] = (np.asarray(image, np.float32) / 255 - _IMAGENET_MEAN) / _IMAGENET_STD
    x0, y0, x1, y1 = (ex["boxes"][:t] / [src_w, src_h, src_w, src_h]).T
    k = len(x0)
    out["boxes"][i, :k] = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
    out["labels"][i, :k] = ex["labels"][:t]
    out["valid"][i, :k] = True
  return out


def train_plain(dtype, steps, data):
  """(step -> train loss, {}, seconds) of one run on `plain_dataset` arrays."""
  config = tiny.get_config()
  config.model.dtype = dtype
  n = len(data["image"])
  step, state = train_step.build_step(config, config.image_size[0], n // config.batch_size)
  rng = np.random.default_rng(config.seed)
  order, losses, t = np.empty(0, int), {}, time.time()
  for i in range(steps):
    if len(order) < config.batch_size:
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = order[: config.batch_size], order[config.batch_size :]
    batch = {k: v[idx] for k, v in data.items()}
    state, metrics = step(state, batch)
    losses[i + 1] = metrics["loss"]
  losses = {k: float(v) for k, v in losses.items()}
  return losses, {}, time.time() - t


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--window", type=int, default=50)
  parser.add_argument("--data", default="pipeline", choices=("pipeline", "plain"))
  args = parser.parse_args()
  runtime.start(tensorflow=args.data == "pipeline")
  print(f"backend {jax.default_backend()}, devices {jax.devices()}")
  runs = {}
  if args.data == "plain":
    data = plain_dataset(tiny.get_config())
    for dtype in ("float32", "bfloat16"):
      runs[dtype] = train_plain(dtype, args.steps, data)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      for dtype in ("float32", "bfloat16"):
        runs[dtype] = train(dtype, args.steps, os.path.join(tmp, dtype))
  print("| steps | float32 loss | bfloat16 loss | difference |")
  print("|---|---|---|---|")
  f32, b16 = runs["float32"][0], runs["bfloat16"][0]
  for start in range(1, args.steps + 1, args.window):
    window = range(start, min(start + args.window, args.steps + 1))
    a, b = np.mean([f32[s] for s in window]), np.mean([b16[s] for s in window])
    print(
      f"| {start}-{window[-1]} | {a:.3f} | {b:.3f} | {b - a:+.3f} ({100 * (b - a) / a:+.1f}%) |"
    )
  for dtype, (_, metrics, seconds) in runs.items():
    ap = f"AP50 {metrics['AP50']:.3f}, AP {metrics['AP']:.3f}, " if metrics else ""
    print(f"{dtype}: {ap}{seconds:.0f} s")


if __name__ == "__main__":
  main()
