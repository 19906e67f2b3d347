"""Inference speed of DETR-R50: jitted forward + post-processing, images/s per resolution.

python benchmarks/inference.py --sizes 800 1024 --batch 1 --dtype float32
"""

import argparse
import time

import jax
import numpy as np

from configs import base
from detr_jax import models, postprocess


def time_inference(size, batch, dtype, steps):
  """Median seconds per batch of the jitted forward pass with post-processing."""
  config = base.get_model_config()
  config.dtype = dtype
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.key(0), (size, size))

  @jax.jit
  def predict(variables, images, sizes):
    out = model.apply(variables, images)
    return postprocess.postprocess(out["pred_logits"], out["pred_boxes"], sizes)

  rng = np.random.default_rng(0)
  images = jax.device_put(rng.normal(size=(batch, size, size, 3)).astype(np.float32))
  sizes = jax.device_put(np.full((batch, 2), size, np.int32))
  jax.block_until_ready(predict(variables, images, sizes))
  ts = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(predict(variables, images, sizes))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[800, 1024])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, devices {jax.devices()}")
  print("| resolution | batch | dtype | s/batch | images/s |")
  print("|---|---|---|---|---|")
  for size in args.sizes:
    t = time_inference(size, args.batch, args.dtype, args.steps)
    print(f"| {size} x {size} | {args.batch} | {args.dtype} | {t:.3f} | {args.batch / t:.2f} |")


if __name__ == "__main__":
  main()
