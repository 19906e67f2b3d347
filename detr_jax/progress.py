"""What a run tells the person watching it: one console line per log step, every value in
TensorBoard and in `WORKDIR/metrics.jsonl`, and the progress of a long evaluation.

The console line (`train_line`), every `log_every_steps`:

step 1200/5120 ep   4.7 | loss  8.91 (ce 0.42 l1 0.21 giou 0.61) | lr 1.0e-4 |  31.5 img/s | ETA 16m

loss is the total set loss (every decoder layer, weighted); ce, l1 and giou are the last
layer's unweighted class, L1 box and GIoU losses; lr the transformer's learning rate; img/s the
training throughput since the previous line (evaluation time excluded); the ETA is the
remaining steps at the segment's step rate plus the remaining evaluations at the last one's
duration.

`metrics.jsonl` (process 0) holds one JSON object per line: {"kind": "train", "step", "time",
every train metric} per log step and {"kind": "eval", "step", "time", "seconds", every eval
metric} per evaluation. A resumed run appends: steps after its checkpoint are logged again,
and `read_metrics` keeps the later line for a step (as `trainer.read_scalars` does for the
TensorBoard events).
"""

import contextlib
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging

from detr_jax import files

METRICS_FILE = "metrics.jsonl"


def format_duration(seconds):
  """'45s', '16m', '2h05m', '3d04h': two units at most."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  minutes = seconds // 60
  if minutes < 60:
    return f"{minutes}m"
  hours, minutes = divmod(minutes, 60)
  if hours < 24:
    return f"{hours}h{minutes:02d}m"
  days, hours = divmod(hours, 24)
  return f"{days}d{hours:02d}h"


def _sci(x):
  """1e-4 -> '1.0e-4' (one decimal, no exponent padding)."""
  if not math.isfinite(x) or x == 0:
    return f"{x:.1f}"
  mantissa, exponent = f"{x:.1e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def train_line(step, total_steps, epoch, metrics, images_per_sec, eta_seconds):
  """The console line of a log step (fixed-width columns; see the module docstring).

  Args:
    step, total_steps: steps done and the run's length. epoch: steps / steps per epoch.
    metrics: the step metrics' means: `loss`, `loss_ce`, `loss_bbox`, `loss_giou`,
      `learning_rate` (and a masks model's `loss_mask`, `loss_dice`). images_per_sec:
      training throughput. eta_seconds: None if unknown.
  """
  width = len(str(total_steps))
  eta = "?" if eta_seconds is None else format_duration(eta_seconds)
  m = metrics
  masks = f" mask {m['loss_mask']:4.2f} dice {m['loss_dice']:4.2f}" if "loss_mask" in m else ""
  return (
    f"step {step:>{width}}/{total_steps} ep {epoch:5.1f} | loss {m['loss']:5.2f} "
    f"(ce {m['loss_ce']:4.2f} l1 {m['loss_bbox']:4.2f} giou {m['loss_giou']:4.2f}{masks}) | "
    f"lr {_sci(m['learning_rate']):6} | {images_per_sec:5.1f} img/s | ETA {eta}"
  )


def eval_line(step, scores, seconds):
  """The console line of an evaluation: the main COCO numbers, images and time."""
  names = [n for n in ("AP", "AP50", "AP75", "VOC_mAP50", "segm_AP", "PQ") if n in scores]
  values = " ".join(f"{n} {scores[n]:.3f}" for n in names)
  return (
    f"eval step {step} | {values} | {scores.get('num_images', 0)} images in "
    f"{format_duration(seconds)}"
  )


def remaining_evals(step, total_steps, eval_every_steps):
  """How many evaluations the steps after `step` run (every `eval_every_steps` and at the end)."""
  if eval_every_steps <= 0 or step >= total_steps:
    return 0
  n = total_steps // eval_every_steps - step // eval_every_steps
  return n + (1 if total_steps % eval_every_steps else 0)


def _append(workdir, record):
  files.append_line(os.path.join(workdir, METRICS_FILE), json.dumps(record, sort_keys=True))


def read_metrics(workdir, kind="train"):
  """{step: {name: value}} of `WORKDIR/metrics.jsonl` lines of `kind` ("train" or "eval").

  A step logged twice (redone after a resume) keeps the later line; lines that do not parse (a
  line cut by a kill) are skipped and counted in the log.
  """
  out, bad = {}, 0
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        bad += line.strip() != ""
        continue
      if record.get("kind") == kind:
        out[record["step"]] = {k: v for k, v in record.items() if k not in ("kind", "step")}
  if bad:
    logging.warning("%s: skipped %d lines that do not parse", path, bad)
  return out


class TrainLog:
  """A training run's log: collects each step's metrics and, at each log step, writes their
  means to TensorBoard (`writer`), to `metrics.jsonl` and as the console line (process 0).

  Args:
    writer: clu metric writer. workdir: where metrics.jsonl is. batch_size: global.
    start_step, total_steps, steps_per_epoch, eval_every_steps: the run's schedule.
  """

  def __init__(
    self, writer, workdir, *, batch_size, start_step, total_steps, steps_per_epoch, eval_every_steps
  ):
    self._writer, self._workdir, self._batch_size = writer, workdir, batch_size
    self._total, self._per_epoch = total_steps, steps_per_epoch
    self._eval_every = eval_every_steps
    self._pending, self._since = [], (time.time(), start_step)
    self._lead = jax.process_index() == 0
    self._rate = None  # (steps, seconds) of training since the first log step
    self._paused = 0.0  # evaluation seconds inside the current window
    self._eval_seconds = None
    self.last = {}

  def add(self, metrics):
    self._pending.append(metrics)

  def write(self, step):
    """Writes the means of the metrics added since the last call."""
    host = jax.device_get(self._pending)
    metrics = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    now = time.time()
    seconds = max(now - self._since[0] - self._paused, 1e-9)
    steps = step - self._since[1]
    metrics["images_per_sec"] = steps * self._batch_size / seconds
    if self._rate is None:  # the first window includes compiling: used only until the next
      rate = steps / seconds
      self._rate = (0, 0.0)
    else:
      self._rate = (self._rate[0] + steps, self._rate[1] + seconds)
      rate = self._rate[0] / self._rate[1]
    eta = (self._total - step) / rate
    eta += remaining_evals(step, self._total, self._eval_every) * (self._eval_seconds or 0.0)
    self._writer.write_scalars(step, {f"train/{k}": v for k, v in metrics.items()})
    if self._lead:
      _append(self._workdir, {"kind": "train", "step": step, "time": now, **metrics})
      epoch = step / self._per_epoch
      logging.info(
        "%s", train_line(step, self._total, epoch, metrics, metrics["images_per_sec"], eta)
      )
    self._pending, self._since, self._paused, self.last = [], (now, step), 0.0, metrics

  @contextlib.contextmanager
  def evaluation(self, step):
    """Times an evaluation (kept out of img/s, counted in the ETA); yields a dict for the
    scores, which are then logged as the eval line and appended to metrics.jsonl."""
    start = time.time()
    scores = {}
    yield scores
    seconds = time.time() - start
    self._paused += seconds
    self._eval_seconds = seconds
    if self._lead and scores:
      _append(
        self._workdir,
        {"kind": "eval", "step": step, "time": time.time(), "seconds": seconds, **scores},
      )
      logging.info("%s", eval_line(step, scores, seconds))


class RateLog:
  """Logs 'WHAT done/total UNIT, rate UNIT/s' at most every `every_seconds` (process 0), so
  a long loop shows it is alive: `update(done)` after each piece."""

  def __init__(self, what, total, unit, every_seconds):
    self._what, self._total, self._unit, self._every = what, total, unit, every_seconds
    self._start = self._last = time.time()

  def update(self, done):
    now = time.time()
    if now - self._last < self._every or jax.process_index() != 0:
      return
    self._last = now
    rate = done / max(now - self._start, 1e-9)
    logging.info(
      "%s %d/%d %s, %.1f %s/s", self._what, done, self._total, self._unit, rate, self._unit
    )
