"""Convergence of DETR, Conditional DETR, Group DETR and both, on the synthetic data (CPU).

Trains each variant of `configs/tiny.py` (plain DETR; `:conditional`; `:group`, 11 query
groups; `:conditional,group`) through `trainer.train_and_evaluate` with the same seed, data,
model size and schedule (20 epochs), evaluating COCO AP50 every `--eval_every` steps (read back
with `trainer.read_scalars(workdir, "eval/AP50")`). It prints, for each variant, the steps it
needs to reach the plain model's final AP50 (its 20-epoch result) and that count over the plain
model's own; the goal of issue 19 is conditional + group within a third of plain's steps. It
writes the AP50 curves as a PNG (matplotlib when installed, else drawn with PIL) and as JSON.

  python benchmarks/convergence.py                      # the tiny setting, 4 runs
  python benchmarks/convergence.py --setting harder     # more, smaller objects (tiny:harder)
  python benchmarks/convergence.py --quick              # 40 steps per variant: a smoke run
  python benchmarks/convergence.py --step_cost          # time a step with 1, 3, 11 groups

`--step_cost` times the trainer's own step (`benchmarks/train_step.py`'s `build_step`) for
each decoder with 1, 3 and 11 query groups on one batch of the tiny setting, alternating the
configurations round by round so a drifting machine affects all alike.

Workdirs go under `--workdir` (default: a temporary directory); an interrupted run resumes
where it stopped when started again with the same `--workdir`.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from configs import tiny
from detr_jax import runtime

VARIANTS = {  # name -> configs/tiny.py variant argument
  "detr": "",
  "conditional": "conditional",
  "group": "group",
  "conditional+group": "conditional,group",
}
COLORS = {
  "detr": (31, 119, 180),
  "conditional": (255, 127, 14),
  "group": (44, 160, 44),
  "conditional+group": (214, 39, 40),
}


def variant_config(variant, setting, seed, steps, eval_every, quick):
  """The tiny config of `variant` in `setting` ("tiny" | "harder")."""
  parts = [p for p in (VARIANTS[variant], "harder" if setting == "harder" else "") if p]
  config = tiny.get_config(",".join(parts))
  config.seed = seed
  if steps > 0:
    config.num_train_steps = steps
  config.eval_every_steps = eval_every
  config.log_every_steps = min(config.log_every_steps, eval_every)
  config.num_eval_images_to_draw = 0
  if quick:
    config.data.update(synthetic_num_train=256, synthetic_num_eval=32)
  config.checkpoint_every_steps = eval_every * 4
  return config


def train_variant(config, workdir):
  """(step -> eval AP50, step -> train loss, seconds) of one run (resumed if interrupted)."""
  from detr_jax import trainer  # the input pipeline needs TensorFlow

  t = time.time()
  trainer.train_and_evaluate(config, workdir)
  seconds = time.time() - t
  return trainer.read_scalars(workdir, "eval/AP50"), trainer.read_scalars(workdir), seconds


def steps_to(curve, target):
  """First evaluated step whose AP50 reaches `target` (None if none does)."""
  for step in sorted(curve):
    if curve[step] >= target:
      return step
  return None


def plot(curves, path, title, target):
  """AP50 against step for every run: {label: {step: AP50}} -> PNG at `path`."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return _plot_pil(curves, path, title, target)
  fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
  for label, curve in curves.items():
    steps = sorted(curve)
    color = np.array(COLORS[label.split(" ")[0]]) / 255
    ax.plot(steps, [curve[s] for s in steps], marker=".", label=label, color=color)
  ax.axhline(target, color="gray", linestyle="--", label=f"target {target:.3f}")
  ax.set_xlabel("training step")
  ax.set_ylabel("COCO AP50 (eval split)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)


def _plot_pil(curves, path, title, target, size=(800, 500)):
  """The same plot drawn with PIL (no matplotlib in the project's environment)."""
  width, height = size
  left, right, top, bottom = 60, 170, 30, 45
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  max_step = max([max(c) for c in curves.values() if c] + [1])
  max_ap = max([max(c.values()) for c in curves.values() if c] + [target, 0.05])
  max_ap = min(1.0, float(np.ceil(max_ap * 10) / 10))
  x = lambda s: left + (width - left - right) * s / max_step
  y = lambda v: height - bottom - (height - top - bottom) * v / max_ap
  for i in range(6):  # grid and ticks
    v, s = max_ap * i / 5, max_step * i / 5
    draw.line([(left, y(v)), (width - right, y(v))], fill=(225, 225, 225))
    draw.text((5, y(v) - 6), f"{v:.2f}", fill="black", font=font)
    draw.line([(x(s), top), (x(s), height - bottom)], fill=(235, 235, 235))
    draw.text((x(s) - 12, height - bottom + 5), f"{int(s)}", fill="black", font=font)
  draw.rectangle([left, top, width - right, height - bottom], outline="black")
  for px in range(left, width - right, 8):  # dashed target line
    draw.line([(px, y(target)), (min(px + 4, width - right), y(target))], fill="gray")
  draw.text((left, 8), title, fill="black", font=font)
  draw.text((width // 2 - 40, height - 18), "training step", fill="black", font=font)
  legend = [(label, COLORS[label.split(" ")[0]]) for label in curves]
  legend.append((f"target {target:.3f}", (128, 128, 128)))
  for i, (label, color) in enumerate(legend):
    ly = top + 10 + 16 * i
    draw.line([(width - right + 10, ly + 6), (width - right + 30, ly + 6)], fill=color, width=3)
    draw.text((width - right + 35, ly), label, fill="black", font=font)
  for label, curve in curves.items():
    points = [(x(s), y(curve[s])) for s in sorted(curve)]
    color = COLORS[label.split(" ")[0]]
    if len(points) > 1:
      draw.line(points, fill=color, width=2)
    for px, py in points:
      draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
  image.save(path)


def convergence(args):
  root = args.workdir or tempfile.mkdtemp(prefix="convergence_")
  seeds = [int(s) for s in args.seeds.split(",")]
  steps = args.steps if args.steps > 0 else (40 if args.quick else -1)
  eval_every = args.eval_every if not args.quick else max(1, min(args.eval_every, 20))
  runs = {}  # (variant, seed) -> (AP50 curve, loss curve, seconds)
  for seed in seeds:
    for variant in args.variants.split(","):
      config = variant_config(variant, args.setting, seed, steps, eval_every, args.quick)
      workdir = os.path.join(root, args.setting, f"{variant}_seed{seed}")
      print(f"== {variant}, seed {seed}: {workdir}", flush=True)
      runs[(variant, seed)] = train_variant(config, workdir)

  plain_final = [max(runs[("detr", s)][0].items())[1] for s in seeds if ("detr", s) in runs]
  target = float(np.mean(plain_final)) if plain_final else args.target
  if args.target > 0:
    target = args.target
  plain_steps = [steps_to(runs[("detr", s)][0], target) for s in seeds if ("detr", s) in runs]
  print(f"\nSetting {args.setting}, seeds {seeds}; target AP50 {target:.3f} (plain DETR's final)")
  print("| variant | final AP50 | steps to target | vs plain | train time |")
  print("|---|---|---|---|---|")
  summary = {}
  for variant in args.variants.split(","):
    finals, reached, times = [], [], []
    for seed in seeds:
      curve, _, seconds = runs[(variant, seed)]
      finals.append(max(curve.items())[1] if curve else float("nan"))
      reached.append(steps_to(curve, target))
      times.append(seconds)
    got = [r for r in reached if r is not None]
    med = float(np.median(got)) if len(got) == len(reached) else None
    ratio = "-"
    if med is not None and plain_steps and None not in plain_steps:
      ratio = f"{med / float(np.median(plain_steps)):.2f}"
    reached_text = ", ".join("never" if r is None else str(r) for r in reached)
    print(
      f"| {variant} | {', '.join(f'{f:.3f}' for f in finals)} | {reached_text} | {ratio} "
      f"| {', '.join(f'{t / 60:.1f}' for t in times)} min |"
    )
    summary[variant] = {"final_AP50": finals, "steps_to_target": reached, "seconds": times}

  curves = {(f"{v} (seed {s})" if len(seeds) > 1 else v): runs[(v, s)][0] for (v, s) in runs}
  title = f"AP50 on the synthetic eval split, {args.setting} setting"
  out = args.out or os.path.join(root, f"convergence_{args.setting}.png")
  plot(curves, out, title, target)
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(
      {
        "setting": args.setting,
        "target": target,
        "summary": summary,
        "curves": {label: {str(k): v for k, v in c.items()} for label, c in curves.items()},
      },
      f,
      indent=1,
    )
  print(f"Curves: {out} (and .json)")


def step_cost(args):
  """Seconds per training step of the tiny setting with 1, 3 and 11 query groups."""
  import jax
  import train_step  # benchmarks/train_step.py: the trainer's own jitted step

  groups = [int(g) for g in args.groups.split(",")]
  runners = {}
  for decoder in ("detr", "conditional"):
    for g in groups:
      config = variant_config(
        "conditional" if decoder == "conditional" else "detr", args.setting, 0, -1, 300, False
      )
      config.model.groups = g
      h, w = config.image_size
      step, state = train_step.build_step(config, h)
      data = train_step._batch(config.batch_size, h, num_targets=6)
      data["labels"] = data["labels"] % config.model.num_classes
      holder = [state]

      def run(step=step, data=data, holder=holder):
        t = time.perf_counter()
        holder[0], metrics = step(holder[0], data)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t

      run()  # compile
      runners[(decoder, g)] = run
  times = {key: [] for key in runners}
  for _ in range(args.rounds):
    for key, run in runners.items():
      times[key].append(run())
  print(f"\nTraining step, {args.setting} setting, batch {config.batch_size}, {args.rounds} rounds")
  print("| decoder | groups | s/step (median) | range | vs 1 group |")
  print("|---|---|---|---|---|")
  for (decoder, g), ts in times.items():
    base = np.median(times[(decoder, groups[0])])
    print(
      f"| {decoder} | {g} | {np.median(ts):.3f} | {min(ts):.3f}-{max(ts):.3f} "
      f"| {np.median(ts) / base:.2f}x |"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--setting", default="tiny", choices=("tiny", "harder"))
  parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
  parser.add_argument("--seeds", default="0", help="comma-separated config.seed values")
  parser.add_argument("--steps", type=int, default=-1, help="> 0: train this many steps")
  parser.add_argument("--quick", action="store_true", help="40 steps on 256 images: a smoke run")
  parser.add_argument("--eval_every", type=int, default=150)
  parser.add_argument("--target", type=float, default=-1.0, help="> 0: this AP50 target")
  parser.add_argument("--workdir", default="", help="root of the runs' workdirs")
  parser.add_argument("--out", default="", help="PNG path (default: in --workdir)")
  parser.add_argument("--step_cost", action="store_true", help="time steps, do not train")
  parser.add_argument("--groups", default="1,3,11", help="--step_cost: group counts")
  parser.add_argument("--rounds", type=int, default=5, help="--step_cost: timed rounds")
  args = parser.parse_args()
  for variant in args.variants.split(","):
    if variant not in VARIANTS:
      parser.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
  runtime.start(tensorflow=not args.step_cost)
  if args.step_cost:
    step_cost(args)
  else:
    convergence(args)


if __name__ == "__main__":
  main()
