"""Inference speed of DETR-R50: jitted forward + post-processing, images/s per resolution.

With --torch, the transformers PyTorch DETR-R50 (random init, eval mode, no_grad, forward and
its post-processing) runs the same batches in the same process, alternating with ours step by
step after warm-up (with a 1 s pause before each, as benchmarks/train_step.py).

python benchmarks/inference.py --sizes 800 1024 --batch 1 --steps 5 --torch
"""

import argparse
import time

import jax
import machine_info
import numpy as np

from configs import base
from detr_jax import models, postprocess, runtime


def make_ours(size, batch, dtype, conv_impl):
  """Run one batch -> seconds, of the jitted forward pass with post-processing."""
  config = base.get_model_config()
  config.dtype = dtype
  config.conv = conv_impl
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.key(0))
  predict = postprocess.make_predict_fn(model)  # what evaluation and predict.py run

  rng = np.random.default_rng(0)
  images = jax.device_put(rng.normal(size=(batch, size, size, 3)).astype(np.float32))
  sizes = jax.device_put(np.full((batch, 2), size, np.int32))

  def run():
    t = time.perf_counter()
    jax.block_until_ready(predict(variables, images, sizes))
    return time.perf_counter() - t

  run()
  return run


def make_torch(size, batch):
  """Run one batch -> seconds, of the transformers DETR-R50 forward and post-processing."""
  import torch
  from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

  cfg = DetrConfig(
    use_timm_backbone=False,
    use_pretrained_backbone=False,
    backbone_config=ResNetConfig(out_features=["stage4"]),
    num_labels=91,
  )
  model = DetrForObjectDetection(cfg).eval()
  processor = DetrImageProcessor()
  images = torch.from_numpy(np.random.default_rng(0).normal(size=(batch, 3, size, size))).float()
  sizes = [(size, size)] * batch

  def run():
    t = time.perf_counter()
    with torch.no_grad():
      out = model(pixel_values=images)
      processor.post_process_object_detection(out, threshold=0.0, target_sizes=sizes)
    return time.perf_counter() - t

  run()
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[800, 1024])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--conv", default="auto", help="config.model.conv: auto | xla | matmul")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference")
  args = parser.parse_args()
  kept = runtime.start(tensorflow=False)
  print(machine_info.describe())
  print(f"host_memory.keep_freed_memory: {'applied' if kept else 'off'}")
  print("| resolution | batch | implementation | s/batch (median) | images/s | time vs torch |")
  print("|---|---|---|---|---|---|")
  for size in args.sizes:
    runners = {
      f"detr_jax {args.dtype}, conv={args.conv}": make_ours(size, args.batch, args.dtype, args.conv)
    }
    if args.torch:
      runners["torch (transformers) float32"] = make_torch(size, args.batch)
    times = {name: [] for name in runners}
    for _ in range(args.steps):
      for name, run in runners.items():
        time.sleep(1.0)
        times[name].append(run())
    ref = times.get("torch (transformers) float32")
    for name, ts in times.items():
      t = float(np.median(ts))
      ratio = f"{np.median(np.array(ts) / np.array(ref)):.2f}x" if ref else "-"
      print(
        f"| {size} x {size} | {args.batch} | {name} | {t:.3f} | {args.batch / t:.2f} | {ratio} |"
      )


if __name__ == "__main__":
  main()
