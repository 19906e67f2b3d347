"""How fast a small segmentation DETR learns masks on a CPU: mask AP50 against wall-clock time.

Trains `configs/tiny.py:masks` (the tiny box model plus the reference's mask head, trained
jointly on the synthetic shapes' exact masks) through `trainer.train_and_evaluate`, evaluating
every `--eval_every` steps, and prints a table of step, minutes since the start, box AP50,
mask AP50 (pycocotools `segm`) and PQ, read back from the run's TensorBoard events; then the
first time mask AP50 reached `--target`.

  python benchmarks/mask_curve.py --workdir /tmp/detr_tiny_masks

With `--box_steps N` it follows the reference's two stages instead: the box model alone
(`configs/tiny.py:masks_stage1`, the same model without the head) for N steps into
`WORKDIR/box`, then the head alone on the frozen box model (`configs/tiny.py:masks_stage2`,
`init_from` that workdir) into `WORKDIR`; the minutes count from the start of stage 1.

  python benchmarks/mask_curve.py --workdir /tmp/detr_tiny_masks2 --box_steps 2400 --steps 1200

The whole 20-epoch run of the config is trained (`--steps` to stop earlier); the run's workdir
stays for `predict.py` (the README's picture).
"""

import argparse
import glob
import os
import time

import machine_info
import tensorflow as tf

from configs import tiny
from detr_jax import runtime, trainer


def timed_scalars(workdir, tag):
  """[(step, wall time, value)] of `tag` in the workdir's events (later files win)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = (event.wall_time, float(tf.make_ndarray(v.tensor)))
  return [(step, t, value) for step, (t, value) in sorted(out.items())]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=-1, help="> 0: train this many steps")
  parser.add_argument("--eval_every", type=int, default=300)
  parser.add_argument("--target", type=float, default=0.5)
  parser.add_argument("--box_steps", type=int, default=0, help="> 0: two stages (see above)")
  args = parser.parse_args()
  runtime.start()
  print(machine_info.describe())
  start = time.time()
  variant = "masks"
  if args.box_steps > 0:
    box_config = tiny.get_config("masks_stage1")
    box_config.num_train_steps = box_config.eval_every_steps = args.box_steps
    box_config.checkpoint_every_steps = args.box_steps
    box_workdir = os.path.join(args.workdir, "box")
    trainer.train_and_evaluate(box_config, box_workdir)
    _, t, box_ap50 = timed_scalars(box_workdir, "eval/AP50")[-1]
    print(f"stage 1: box AP50 {box_ap50:.3f} at step {args.box_steps}, {(t - start) / 60:.1f} min")
    variant = "masks_stage2"
  config = tiny.get_config(variant)
  if args.box_steps > 0:
    config.init_from = box_workdir
  config.eval_every_steps = args.eval_every
  config.checkpoint_every_steps = args.eval_every
  config.num_train_steps = args.steps
  trainer.train_and_evaluate(config, args.workdir)
  box = {s: v for s, _, v in timed_scalars(args.workdir, "eval/AP50")}
  pq = {s: v for s, _, v in timed_scalars(args.workdir, "eval/PQ")}
  print(f"\nconfigs/tiny.py:{variant}, eval every {args.eval_every} steps")
  print("| step | minutes | box AP50 | mask AP50 | PQ |")
  print("|---|---|---|---|---|")
  reached = None
  for s, t, mask_ap50 in timed_scalars(args.workdir, "eval/segm_AP50"):
    minutes = (t - start) / 60
    print(
      f"| {s} | {minutes:.1f} | {box.get(s, float('nan')):.3f} | {mask_ap50:.3f} | "
      f"{pq.get(s, float('nan')):.3f} |"
    )
    if reached is None and mask_ap50 >= args.target:
      reached = (s, minutes)
  if reached:
    print(f"mask AP50 >= {args.target} at step {reached[0]}, {reached[1]:.1f} min")
  else:
    print(f"mask AP50 did not reach {args.target}")


if __name__ == "__main__":
  main()
