"""Hungarian matcher speed: detr_jax.matcher against a scipy loop and optax's JAX solver.

Problems are what the DETR loss matches in one step: `--images` images x `--layers` decoder
layers, Q = 100 queries, targets padded to T = 100. Target counts per image follow a COCO-like
long-tailed draw (negative binomial with r = 1, mean 7.3, clipped to [0, 100]); every layer of
an image has the image's targets. Costs are the reference matching cost
5 * L1 - prob[label] - 2 * GIoU of random boxes and random softmax scores, float32.

Timed (each jitted and warmed up first, median of `--repeats` runs, min in parentheses):
  * jax, batched: `assign(cost [B, L, T, Q], valid, "jax")`, one call for all problems.
  * jax, jax.vmap over images: the same under `jax.vmap` (folded into the batch).
  * jax, Python loop: `assign` jitted on one [T, Q] problem, called once per problem.
  * scipy callback: `assign(..., "scipy")`, one `pure_callback` for all problems.
  * raw scipy loop: `linear_sum_assignment` on each problem's valid rows, NumPy arrays
    already on the host (no JAX at all): the reference's host-side matcher.
  * optax: `jax.vmap(optax.assignment.hungarian_algorithm)` on the padded [T, Q] problems with
    the padded rows set to cost 0 (a constant row changes no optimal assignment of the real
    rows; optax has no row mask, so it always solves the full 100 x 100 problem).

  python benchmarks/matcher.py                      # the table in docs/benchmarks.md
  python benchmarks/matcher.py --sweep_slots        # slot counts of the two solver loops
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import machine_info  # noqa: E402

from detr_jax import matcher  # noqa: E402
from detr_jax.matcher import jax_solver  # noqa: E402


def detr_problems(rng, images, layers, t=100, q=100, mean_targets=7.3):
  """cost float32 [B, L, T, Q], valid bool [B, L, T], counts int [B]."""
  counts = np.clip(rng.negative_binomial(1, 1 / (mean_targets + 1), images), 0, t)

  def boxes(*shape):
    return np.concatenate(
      [rng.uniform(0, 1, shape + (2,)), rng.uniform(0.02, 0.6, shape + (2,))], -1
    )

  def xyxy(b):
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)

  tgt = boxes(images, 1, t)[:, :, :, None]  # [B, 1, T, 1, 4]
  pred = boxes(images, layers, q)[:, :, None]  # [B, L, 1, Q, 4]
  labels = rng.integers(0, 91, (images, t))
  logits = rng.normal(size=(images, layers, q, 92)) * 2
  prob = np.exp(logits - logits.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  prob_t = np.take_along_axis(
    prob, np.broadcast_to(labels[:, None, None], (images, layers, q, t)), -1
  )
  l1 = np.abs(tgt - pred).sum(-1)
  a, b = xyxy(tgt), xyxy(pred)
  inter = np.prod(
    np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None), -1
  )
  union = np.prod(a[..., 2:] - a[..., :2], -1) + np.prod(b[..., 2:] - b[..., :2], -1) - inter
  hull = np.prod(np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2]), -1)
  giou = inter / union - (hull - union) / hull
  cost = (5 * l1 - np.swapaxes(prob_t, -1, -2) - 2 * giou).astype(np.float32)
  valid = np.broadcast_to((np.arange(t) < counts[:, None])[:, None], (images, layers, t)).copy()
  # Real targets at arbitrary slots, not only a prefix.
  for i in range(images):
    perm = rng.permutation(t)
    cost[i] = cost[i][:, perm]
    valid[i] = valid[i][:, perm]
  return cost, valid, counts


def timed(fn, repeats):
  """(median, min) seconds of fn() after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times)), float(np.min(times))


def check_optimal(cost, valid, out):
  """Max relative difference of the total cost from scipy's optimum, over all problems."""
  t, q = cost.shape[-2:]
  worst = 0.0
  for c, v, o in zip(cost.reshape(-1, t, q), valid.reshape(-1, t), np.asarray(out).reshape(-1, t)):
    rows = np.flatnonzero(v)
    if rows.size == 0:
      continue
    sub = c[rows].astype(np.float64)
    r, k = linear_sum_assignment(sub)
    assert np.all(o[rows] >= 0) and np.unique(o[rows]).size == rows.size
    worst = max(
      worst,
      abs(sub[np.arange(rows.size), o[rows]].sum() - sub[r, k].sum()) / np.abs(sub[r, k]).sum(),
    )
  return worst


def run(images, layers, repeats, optax_repeats, seed):
  rng = np.random.default_rng(seed)
  cost_np, valid_np, counts = detr_problems(rng, images, layers)
  cost, valid = jnp.asarray(cost_np), jnp.asarray(valid_np)
  t, q = cost.shape[-2:]
  results = {}

  batched = jax.jit(lambda c, v: matcher.assign(c, v, "jax"))
  results["jax, batched"] = timed(lambda: batched(cost, valid), repeats)
  vmapped = jax.jit(jax.vmap(lambda c, v: matcher.assign(c, v, "jax")))
  results["jax, jax.vmap over images"] = timed(lambda: vmapped(cost, valid), repeats)

  single = jax.jit(lambda c, v: matcher.assign(c, v, "jax"))
  flat_c, flat_v = cost.reshape(-1, t, q), valid.reshape(-1, t)
  problems = [(flat_c[i], flat_v[i]) for i in range(flat_c.shape[0])]
  results["jax, Python loop over problems"] = timed(
    lambda: [single(c, v) for c, v in problems], max(3, repeats // 10)
  )

  callback = jax.jit(lambda c, v: matcher.assign(c, v, "scipy"))
  results["scipy callback"] = timed(lambda: callback(cost, valid), repeats)

  host_c, host_v = cost_np.reshape(-1, t, q), valid_np.reshape(-1, t)

  def raw_scipy():
    return [linear_sum_assignment(c[v]) for c, v in zip(host_c, host_v)]

  results["raw scipy loop"] = timed(raw_scipy, repeats)

  padded = jnp.where(flat_v[..., None], flat_c, 0.0)
  hungarian = jax.jit(jax.vmap(optax.assignment.hungarian_algorithm))
  results["optax hungarian_algorithm, vmap"] = timed(lambda: hungarian(padded), optax_repeats)

  worst = check_optimal(cost_np, valid_np, batched(cost, valid))
  return results, counts, worst


def sweep_slots(images, layers, repeats, seed, slot_counts, which):
  """Time of the batched jax matcher with `jax_solver.<which>` (a slot count rule) fixed to S."""
  rng = np.random.default_rng(seed)
  cost, valid, _ = detr_problems(rng, images, layers)
  n, t, q = images * layers, cost.shape[-2], cost.shape[-1]
  flat_c, flat_v = jnp.asarray(cost).reshape(n, t, q), jnp.asarray(valid).reshape(n, t)
  solve = jax_solver._solve_batch.__wrapped__  # not the module's jit: its trace caches S
  original = getattr(jax_solver, which)
  rows = []
  try:
    for s in slot_counts:
      setattr(jax_solver, which, lambda n, s=s: min(n, s))
      fn = jax.jit(lambda c, v: solve(c, v))  # a new function: no cached trace
      rows.append((s, timed(lambda fn=fn: fn(flat_c, flat_v), repeats)))
  finally:
    setattr(jax_solver, which, original)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, nargs="+", default=[36, 64])
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--optax_repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sweep_slots", action="store_true")
  args = parser.parse_args()
  print(f"{machine_info.describe()}, optax {optax.__version__}")

  if args.sweep_slots:
    for which in ("_greedy_slots", "_num_slots"):
      for images in args.images:
        n = images * args.layers
        print(
          f"\n{which}: {images} images x {args.layers} layers ({n} problems),"
          f" default {getattr(jax_solver, which)(n)}"
        )
        print("| slots | median ms | min ms |\n|---|---|---|")
        counts = [8, 16, 24, 32, 48, 64, 96]
        for s, (med, best) in sweep_slots(
          images, args.layers, args.repeats, args.seed, counts, which
        ):
          print(f"| {s} | {med * 1e3:.2f} | {best * 1e3:.2f} |")
    return

  columns, all_results = [], []
  for images in args.images:
    results, counts, worst = run(images, args.layers, args.repeats, args.optax_repeats, args.seed)
    columns.append(
      f"{images} x {args.layers} = {images * args.layers} problems "
      f"(targets/image mean {counts.mean():.1f}, max {counts.max()})"
    )
    all_results.append(results)
    print(f"{images} images: jax matcher total cost vs scipy, max relative difference {worst:.1e}")

  print("\n| method | " + " | ".join(columns) + " |")
  print("|---|" + "---|" * len(columns))
  for name in all_results[0]:
    cells = [f"{r[name][0] * 1e3:.2f} ms ({r[name][1] * 1e3:.2f})" for r in all_results]
    print(f"| {name} | " + " | ".join(cells) + " |")
  for label, num, den in [
    ("jax batched / raw scipy loop", "jax, batched", "raw scipy loop"),
    ("optax / jax batched", "optax hungarian_algorithm, vmap", "jax, batched"),
  ]:
    cells = [f"{r[num][0] / r[den][0]:.2f}x" for r in all_results]
    print(f"| {label} (medians) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
