"""bfloat16 compute against float32: training-loss curves of the tiny config, same seed and data.

Trains `configs/tiny.py` twice through `trainer.train_and_evaluate` (float32, then
`model.dtype=bfloat16`: bfloat16 activations and matmuls, float32 parameters, optimizer and
loss), with the same seed, for `--steps` steps, and prints both loss curves (mean of each
`--window` steps) and, at the end, the COCO AP50 of both on the validation images.

  python benchmarks/bf16_curve.py --steps 600 --window 50
"""

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from configs import tiny
from detr_jax import checkpoint, trainer


def train(dtype, steps, workdir):
  """(step -> train loss, eval metrics, seconds) of one run."""
  config = tiny.get_config()
  config.model.dtype = dtype
  config.num_train_steps = steps
  config.log_every_steps = 1
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  t = time.time()
  result = trainer.train_and_evaluate(config, workdir)
  seconds = time.time() - t
  losses = trainer.read_scalars(workdir, "train/loss")
  return losses, result["eval"], seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--window", type=int, default=50)
  args = parser.parse_args()
  checkpoint.quiet_orbax_logging()
  print(f"backend {jax.default_backend()}, devices {jax.devices()}")
  runs = {}
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
    print(f"{dtype}: AP50 {metrics['AP50']:.3f}, AP {metrics['AP']:.3f}, {seconds:.0f} s")


if __name__ == "__main__":
  main()
