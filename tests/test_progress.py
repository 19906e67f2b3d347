"""detr_jax/progress.py: the console line, metrics.jsonl, the ETA and evaluation progress."""

import json
import logging as std_logging

import numpy as np
import pytest
from absl import logging

from detr_jax import files, progress

METRICS = {"loss": 8.9137, "loss_ce": 0.4249, "loss_bbox": 0.2071, "loss_giou": 0.6123}


def test_train_line_format():
  line = progress.train_line(1200, 5120, 4.6875, {**METRICS, "learning_rate": 1e-4}, 31.46, 965)
  assert line == (
    "step 1200/5120 ep   4.7 | loss  8.91 (ce 0.42 l1 0.21 giou 0.61) | lr 1.0e-4 "
    "|  31.5 img/s | ETA 16m"
  )
  # Other magnitudes keep the columns.
  other = progress.train_line(
    7, 5120, 0.01, {**METRICS, "loss": 12.5, "learning_rate": 2.5e-6}, 5.0, 2 * 86400
  )
  assert other.startswith("step    7/5120 ep   0.0 | loss 12.50 (ce 0.42")
  bars = lambda s: [i for i, c in enumerate(s) if c == "|"]
  assert bars(other) == bars(line)
  assert other.endswith("| lr 2.5e-6 |   5.0 img/s | ETA 2d00h")
  assert progress.train_line(1, 10, 0.1, {**METRICS, "learning_rate": 0.0}, 1, None).endswith(
    "| lr 0.0    |   1.0 img/s | ETA ?"
  )


@pytest.mark.parametrize(
  "seconds, text",
  [
    (0, "0s"),
    (59.4, "59s"),
    (60, "1m"),
    (3599, "59m"),
    (3600, "1h00m"),
    (7500, "2h05m"),
    (86400 + 4 * 3600 + 59, "1d04h"),
  ],
)
def test_format_duration(seconds, text):
  assert progress.format_duration(seconds) == text


def test_remaining_evals_counts_the_eval_steps_after_step():
  for total in (10, 12, 13):
    for every in (0, 1, 4, 5, 20):
      for step in range(total + 1):
        expected = (
          0 if every <= 0 else sum(s % every == 0 or s == total for s in range(step + 1, total + 1))
        )
        assert progress.remaining_evals(step, total, every) == expected, (step, total, every)


def test_read_metrics_keeps_the_later_line_and_skips_a_cut_one(tmp_path):
  path = str(tmp_path / progress.METRICS_FILE)
  write = lambda record: files.append_line(path, json.dumps(record))
  write({"kind": "train", "step": 1, "loss": 3.0})
  write({"kind": "train", "step": 2, "loss": 2.0})
  with open(path, "a") as f:  # a line cut by a kill
    f.write('{"kind": "train", "step": 3, "lo')
  write({"kind": "train", "step": 2, "loss": 2.5})  # step 2 redone after a resume
  write({"kind": "eval", "step": 2, "AP": 0.5})
  assert open(path).read().count("\n") == 5  # the cut line was ended, not glued to
  assert progress.read_metrics(str(tmp_path)) == {1: {"loss": 3.0}, 2: {"loss": 2.5}}
  assert progress.read_metrics(str(tmp_path), "eval") == {2: {"AP": 0.5}}


class _Writer:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = scalars


@pytest.fixture
def log_lines():
  lines = []
  handler = std_logging.Handler()
  handler.emit = lambda record: lines.append(record.getMessage())
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger("absl").addHandler(handler)
  yield lines
  std_logging.getLogger("absl").removeHandler(handler)
  logging.set_verbosity(verbosity)


def test_train_log_rates_eta_and_files(tmp_path, monkeypatch, log_lines):
  clock = [1000.0]
  monkeypatch.setattr(progress.time, "time", lambda: clock[0])
  writer = _Writer()
  log = progress.TrainLog(
    writer,
    str(tmp_path),
    batch_size=4,
    start_step=0,
    total_steps=100,
    steps_per_epoch=10,
    eval_every_steps=50,
  )
  step_metrics = lambda v: {**{k: np.float32(v) for k in METRICS}, "learning_rate": 1e-4}
  for step in range(1, 11):  # the first window: 10 steps in 20 s (compiling included)
    log.add(step_metrics(step))
    clock[0] += 2.0
  log.write(10)
  assert writer.scalars[10]["train/loss"] == pytest.approx(5.5)
  assert writer.scalars[10]["train/images_per_sec"] == pytest.approx(2.0)
  assert log_lines[-1].endswith("|   2.0 img/s | ETA 3m")  # 90 steps at 0.5 steps/s
  for _ in range(11, 21):  # 10 steps in 5 s, then a 30 s evaluation
    log.add(step_metrics(1))
    clock[0] += 0.5
  log.write(20)
  with log.evaluation(20) as scores:
    clock[0] += 30.0
    scores.update(AP=0.25, AP50=0.5, AP75=0.125, num_images=64)
  assert log_lines[-1] == "eval step 20 | AP 0.250 AP50 0.500 AP75 0.125 | 64 images in 30s"
  for _ in range(21, 31):  # 10 steps in 10 s after the evaluation
    log.add(step_metrics(1))
    clock[0] += 1.0
  log.write(30)
  # img/s leaves the evaluation out; ETA: 70 steps at (20 steps / 15 s) + 2 evals x 30 s.
  assert writer.scalars[30]["train/images_per_sec"] == pytest.approx(4.0)
  assert log_lines[-1].endswith(f"|   4.0 img/s | ETA {progress.format_duration(52.5 + 60)}")
  train = progress.read_metrics(str(tmp_path))
  assert sorted(train) == [10, 20, 30] and train[10]["loss"] == pytest.approx(5.5)
  assert progress.read_metrics(str(tmp_path), "eval")[20]["seconds"] == pytest.approx(30.0)


def test_rate_log_reports_at_most_every_interval(monkeypatch, log_lines):
  clock = [0.0]
  monkeypatch.setattr(progress.time, "time", lambda: clock[0])
  rate = progress.RateLog("eval", 5000, "images", 30)
  for done in range(256, 5001, 256):
    clock[0] += 10.0
    rate.update(done)
  assert log_lines == [
    "eval 768/5000 images, 25.6 images/s",
    "eval 1536/5000 images, 25.6 images/s",
    "eval 2304/5000 images, 25.6 images/s",
    "eval 3072/5000 images, 25.6 images/s",
    "eval 3840/5000 images, 25.6 images/s",
    "eval 4608/5000 images, 25.6 images/s",
  ]
