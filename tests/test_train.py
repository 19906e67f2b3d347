"""End to end: an uninterrupted run (the reference), its log lines and metrics.jsonl; the same
run SIGKILLed at three moments and resumed (once past a damaged checkpoint) on the same
trajectory; resuming with another model; a full disk; SIGTERM; 2 processes against 1."""

import json
import logging as std_logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import logging

from detr_jax import checkpoint, evaluation, models, progress, runtime, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny DETR on a small synthetic set: compiles and trains a step in seconds on CPU. The
# persistent compilation cache (tests/conftest.py) serves every run of it, in this process
# and in the train.py subprocesses.
OVERRIDES = {
  "model.backbone": "resnet18",
  "model.hidden_dim": 32,
  "model.num_heads": 2,
  "model.dim_feedforward": 64,
  "model.num_encoder_layers": 1,
  "model.num_decoder_layers": 2,
  "model.num_queries": 8,
  "image_size": "(64,96)",  # tests/test_predict.py's: the same compiled programs
  "batch_size": 8,
  "eval_batch_size": 8,
  "data.synthetic_num_train": 64,
  "data.synthetic_num_eval": 12,
  "data.synthetic_image_size": "(64,64)",
  "data.max_boxes": 8,
  "num_train_steps": 10,
  "checkpoint_every_steps": 2,
  "log_every_steps": 1,
  "eval_every_steps": 4,
  "num_eval_images_to_draw": 2,
}
EVAL_STEPS = [4, 8, 10]


def _run(workdir, overrides=None, devices=1, extra=(), wait=True, kill=None, **popen):
  """train.py (or, with `kill="MOMENT:N"`, tests/train_killed.py) in a subprocess."""
  script = ["train.py"] if kill is None else ["tests/train_killed.py", kill]
  args = [sys.executable, *script, "--config", "configs/tiny.py", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in {**OVERRIDES, **(overrides or {})}.items()]
  env = dict(
    os.environ,
    XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="3",
  )
  proc = subprocess.Popen(
    args + list(extra),
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **popen,
  )
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  expected = 0 if kill is None else -signal.SIGKILL
  assert proc.returncode == expected, out[-4000:]
  return out


def _losses(workdir):
  return {step: m["loss"] for step, m in progress.read_metrics(workdir).items()}


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _final_params(workdir, step):
  config = checkpoint.load_config(workdir)
  abstract = models.abstract_variables(models.build_model(config.model))
  manager = checkpoint.create_manager(workdir, read_only=True)
  params = checkpoint.restore(manager, step, variables=abstract)["variables"]["params"]
  manager.close()
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(params)}


class _Lines(std_logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines += record.getMessage().splitlines()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(workdir, console lines) of an uninterrupted in-process run: 10 steps, checkpoints every
  2, evaluations at 4, 8 and 10."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  handler, verbosity = _Lines(), logging.get_verbosity()
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger("absl").addHandler(handler)
  every = evaluation.PROGRESS_EVERY_SECONDS
  evaluation.PROGRESS_EVERY_SECONDS = 0  # the evaluation's progress after every batch
  try:
    trainer.train_and_evaluate(_tiny_config(), workdir)
  finally:
    evaluation.PROGRESS_EVERY_SECONDS = every
    std_logging.getLogger("absl").removeHandler(handler)
    logging.set_verbosity(verbosity)
  return workdir, handler.lines


TRAIN_LINE = re.compile(
  r"step +(\d+)/10 ep +([\d.]+) \| loss +([\d.]+) \(ce ([\d.]+) l1 ([\d.]+) giou ([\d.]+)\) "
  r"\| lr ([\d.]+(?:e-\d+)?) +\| +([\d.]+) img/s \| ETA (\d+[smhd]\w*)$"
)


def test_log_lines_metrics_jsonl_and_config_history(reference):
  workdir, lines = reference
  train = progress.read_metrics(workdir, "train")
  evals = progress.read_metrics(workdir, "eval")
  assert sorted(train) == list(range(1, 11)) and sorted(evals) == EVAL_STEPS
  # metrics.jsonl holds what TensorBoard holds.
  tb = trainer.read_scalars(workdir, "train/loss")
  for step, m in train.items():
    np.testing.assert_allclose(m["loss"], tb[step], rtol=1e-6)
    assert np.isfinite(m["loss"]) and m["images_per_sec"] > 0
  final = json.load(open(os.path.join(workdir, "eval", "step_10_metrics.json")))
  assert final["num_images"] == 12 and 0.0 <= final["AP50"] <= 1.0
  assert {k: evals[10][k] for k in final} == final and evals[10]["seconds"] > 0
  # One console line per log step, the numbers of metrics.jsonl, '|' in fixed columns.
  rows = [(line, TRAIN_LINE.search(line)) for line in lines if TRAIN_LINE.search(line)]
  assert [int(m.group(1)) for _, m in rows] == list(range(1, 11)), lines
  for line, m in rows:
    got = train[int(m.group(1))]
    assert float(m.group(2)) == pytest.approx(int(m.group(1)) / 8, abs=0.051)
    for group, name in zip(range(3, 7), ("loss", "loss_ce", "loss_bbox", "loss_giou")):
      assert float(m.group(group)) == pytest.approx(got[name], abs=0.0051), (line, name)
    assert float(m.group(7)) == pytest.approx(got["learning_rate"], rel=0.051)
  columns = {
    tuple(i for i, c in enumerate(line[line.index("step") :]) if c == "|") for line, _ in rows
  }
  assert len(columns) == 1, [line for line, _ in rows]
  assert not [line for line in lines if "train/loss" in line]  # not every scalar
  for step in EVAL_STEPS:
    assert any(line.startswith(f"eval step {step} | AP ") for line in lines), lines
  progress_lines = [
    line for line in lines if re.fullmatch(r"eval \d+/12 images, .* images/s", line)
  ]
  assert [line.split()[1] for line in progress_lines] == ["8/12", "12/12"] * 3, lines
  # The config of the one segment.
  (segment,) = [json.loads(line) for line in open(os.path.join(workdir, "config_history.jsonl"))]
  assert segment["start_step"] == 0 and segment["changes"] == {}
  assert segment["config"] == json.load(open(os.path.join(workdir, "config.json")))


def _damage(workdir, step):
  """Truncates every file of checkpoint `step` to half its size (a partial copy)."""
  for root, _, names in os.walk(os.path.join(workdir, "checkpoints", str(step))):
    for name in names:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)


def test_killed_three_times_and_resumed_past_a_damaged_checkpoint_ends_like_the_reference(
  reference, tmp_path
):
  ref_dir, _ = reference
  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  workdir = str(tmp_path / "killed")
  plan = [f"seed {seed}"]

  # 1. Killed while the async save of checkpoint c is being written: resumes from c - 2.
  c = rng.choice([4, 6])
  plan.append(f"kill while writing checkpoint {c}")
  _run(workdir, kill=f"checkpoint:{c}")
  assert _steps(workdir) == list(range(2, c, 2))[-3:], plan
  assert os.path.isdir(os.path.join(workdir, "checkpoints", f"{c}.orbax-checkpoint-tmp")), plan

  # 2. Killed during an evaluation.
  e = rng.choice([s for s in EVAL_STEPS[:-1] if s > c - 2])
  plan.append(f"kill during the eval at step {e}")
  out = _run(workdir, kill=f"eval:{e}")
  assert f"Resumed from step {c - 2}" in out and "Evaluating 12 images" in out, plan
  assert not os.path.exists(os.path.join(workdir, "eval", f"step_{e}_metrics.json")), plan
  assert max(_steps(workdir)) in (e - 2, e), plan

  # 3. Killed right after a random step (from 7 on: the saves up to step 4 are complete,
  # each save waits for the previous one, so 4. has two checkpoints to choose from).
  resumed = max(_steps(workdir))
  s = rng.randint(max(resumed + 1, 7), 9)
  plan.append(f"kill after step {s}")
  out = _run(workdir, kill=f"step:{s}")
  assert f"Resumed from step {resumed}" in out, plan
  newest, previous = _steps(workdir)[-1], _steps(workdir)[-2]
  assert newest <= s, plan

  # 4. The newest checkpoint damaged (a partial copy): the run says so, moves it aside,
  # resumes from the one before, and may change its checkpoint interval on the way.
  _damage(workdir, newest)
  plan.append(f"damaged checkpoint {newest}")
  out = _run(workdir, {"checkpoint_every_steps": 5, "keep_checkpoints": 4})
  assert re.search(rf"Checkpoint step {newest} \(.*\) cannot be read", out), (plan, out[-3000:])
  assert f"Resumed from step {previous}" in out, plan
  assert "with checkpoint_every_steps = 5 (was 2)" in out, plan
  assert os.path.exists(os.path.join(workdir, "checkpoints_damaged", str(newest), "REASON.txt"))
  assert "Traceback" not in out, out[-3000:]

  # The trajectory and the final parameters are the uninterrupted run's.
  got, ref = _losses(workdir), _losses(ref_dir)
  assert sorted(got) == sorted(ref) == list(range(1, 11)), plan
  for step in ref:
    np.testing.assert_allclose(got[step], ref[step], rtol=1e-5, err_msg=f"step {step}, {plan}")
  final, expected = _final_params(workdir, 10), _final_params(ref_dir, 10)
  assert final.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(final[name], expected[name], rtol=1e-5, err_msg=f"{name} {plan}")
  segments = [json.loads(line) for line in open(os.path.join(workdir, "config_history.jsonl"))]
  assert [seg["start_step"] for seg in segments] == [0, c - 2, resumed, previous], plan
  assert segments[-1]["changes"] == {"checkpoint_every_steps": [2, 5], "keep_checkpoints": [3, 4]}

  # eval.py's evaluation of the resumed run's last checkpoint gives the reference's final
  # eval (in this process; .ci/readme_commands.py runs eval.py itself on the quickstart).
  os.remove(os.path.join(workdir, "eval", "step_10_metrics.json"))  # the training's own
  evaluated, step = evaluation.evaluate_workdir(workdir)
  load = lambda d, what: json.load(open(os.path.join(d, "eval", f"step_10_{what}.json")))
  assert step == 10 and load(workdir, "metrics") == evaluated
  assert set(evaluated) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
  np.testing.assert_allclose(evaluated["AP"], load(ref_dir, "metrics")["AP"], atol=1e-6)
  dets = load(workdir, "detections")
  assert len(dets) == 12 * 8
  assert {d["image_id"] for d in dets} == {d["image_id"] for d in load(ref_dir, "detections")}


def _listing(workdir):
  """{path: (size, mtime)} of every file under `workdir`."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      out[path] = (os.path.getsize(path), os.path.getmtime(path))
  return out


def test_resume_with_another_model_stops_before_touching_the_workdir(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  before = _listing(workdir)
  config = _tiny_config(**{"model.hidden_dim": 64, "model.num_queries": 4, "num_train_steps": 12})
  with pytest.raises(runtime.UserError) as e:
    trainer.train_and_evaluate(config, workdir)
  text = str(e.value)
  assert "model.hidden_dim: 32 (saved) vs 64 (given)" in text
  assert "model.num_queries: 8 (saved) vs 4 (given)" in text
  assert "num_train_steps" not in text  # may change on resume
  assert "new --workdir" in " ".join(text.split()) and "init_from" in text
  assert _listing(workdir) == before


def test_full_disk_while_saving_names_the_step_and_keeps_the_earlier_checkpoints(
  reference, tmp_path, monkeypatch
):
  """The write failure is injected where tensorstore reports it: orbax's array write, in the
  async save's thread, raising tensorstore's error for a full disk."""
  from orbax.checkpoint._src.serialization import serialization

  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  write = serialization.async_serialize_from_host

  async def full_disk_at_step_12(rslices, tensorstore_spec, **kwargs):
    if "/checkpoints/12.orbax-checkpoint-tmp" in str(tensorstore_spec):
      raise ValueError(
        'RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at local file '
        f'"{workdir}/checkpoints/12.orbax-checkpoint-tmp/variables/": Failed to write 4096 '
        "bytes to file 5: No space left on device [os_error_code='28']"
      )
    return await write(rslices, tensorstore_spec, **kwargs)

  monkeypatch.setattr(serialization, "async_serialize_from_host", full_disk_at_step_12)
  config = _tiny_config(num_train_steps=14, eval_every_steps=0)
  with pytest.raises(runtime.UserError) as e:
    trainer.train_and_evaluate(config, workdir)
  text = str(e.value)
  assert "Out of disk space while saving checkpoint step 12 to " in text
  assert os.path.join(workdir, "checkpoints", "12") in text and "[6, 8, 10]" in text
  monkeypatch.undo()
  manager = checkpoint.create_manager(workdir)  # a rerun's: removes the unfinished save
  assert manager.all_steps() == [6, 8, 10]
  unfinished = lambda: [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
  deadline = time.time() + 60  # orbax removes it in the background
  while unfinished() and time.time() < deadline:
    time.sleep(0.1)
  assert not unfinished()
  manager.close()
  assert _final_params(workdir, 10).keys() == _final_params(reference[0], 10).keys()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "term")
  proc = _run(workdir, {"num_train_steps": 1000, "checkpoint_every_steps": 1000}, wait=False)
  deadline = time.time() + 300
  while not _losses(workdir) and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "Preempted" in out
  assert len(_steps(workdir)) == 1 and 0 < _steps(workdir)[0] < 1000


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(reference, tmp_path):
  """2 processes x 1 CPU device each against the reference (1 process, 1 device): the same
  losses and, through the evaluation's gather (which lines the processes up first, as
  eval.py's does), the same detections and AP."""
  ref_dir, _ = reference
  steps = {"num_train_steps": 4, "eval_every_steps": 4, "checkpoint_every_steps": 4}
  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [
    _run(
      multi,
      steps,
      devices=1,
      wait=False,
      extra=[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
    )
    for i in range(2)
  ]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-4000:]
  ref, got = _losses(ref_dir), _losses(multi)
  assert sorted(got) == [1, 2, 3, 4]
  for step in got:
    np.testing.assert_allclose(got[step], ref[step], rtol=1e-5, err_msg=f"step {step}")
  # Evaluation over two hosts sees every image exactly once and scores like one host.
  load = lambda d, what: json.load(open(os.path.join(d, "eval", f"step_4_{what}.json")))
  m_single, m_multi = load(ref_dir, "metrics"), load(multi, "metrics")
  assert m_single["num_images"] == m_multi["num_images"] == 12
  np.testing.assert_allclose(m_multi["AP"], m_single["AP"], atol=1e-4)
  ids = lambda d: sorted({r["image_id"] for r in load(d, "detections")})
  assert ids(multi) == ids(ref_dir) and len(load(multi, "detections")) == 12 * 8


def _tiny_config(**override):
  from configs import tiny
  from detr_jax.config_utils import apply_overrides

  config = tiny.get_config()
  return apply_overrides(config, [f"{k}={v}" for k, v in {**OVERRIDES, **override}.items()])


@pytest.mark.parametrize(
  "override, devices, message",
  [
    ({"batch_size": 6}, 4, "batch_size=6 must be a positive multiple of the device count"),
    ({"eval_batch_size": 6}, 4, "eval_batch_size=6 must be a positive multiple"),
    ({"image_size": "(70,64)"}, 1, "divisible by the backbone stride 32"),
    (
      {"model.backbone": "resnet50", "model.dilation": True, "image_size": "(72,72)"},
      1,
      "stride 16",
    ),
    ({"num_train_steps": 0, "num_epochs": 0}, 1, "num_train_steps > 0 or config.num_epochs"),
  ],
)
def test_inconsistent_config_fails_at_start(override, devices, message):

  with pytest.raises(ValueError, match=message):
    trainer.validate_config(_tiny_config(**override), num_devices=devices)


def test_class_count_must_match_the_dataset(tmp_path):

  with pytest.raises(ValueError, match="num_classes=9 but dataset 'synthetic' has 4 classes"):
    trainer.train_and_evaluate(_tiny_config(**{"model.num_classes": 9}), str(tmp_path))


def test_unknown_config_field_fails_at_start(tmp_path):

  config = _tiny_config()
  config.model.hiden_dim = 3
  with pytest.raises(ValueError, match="model.hiden_dim"):
    trainer.validate_config(config, num_devices=1)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
  tmp_path, monkeypatch
):
  import input_pipeline
  from detr_jax import checkpoint

  make = input_pipeline.create_train_iterator

  def poisoned(*args, start_step=0, **kwargs):
    for step, batch in enumerate(make(*args, start_step=start_step, **kwargs), start_step + 1):
      if step == 4:  # the 4th step sees a NaN image
        batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
      yield batch

  monkeypatch.setattr(input_pipeline, "create_train_iterator", poisoned)
  config = _tiny_config(num_train_steps=6, eval_every_steps=0, log_every_steps=3)
  with pytest.raises(FloatingPointError, match="Non-finite loss at step 4"):
    trainer.train_and_evaluate(config, str(tmp_path))
  manager = checkpoint.create_manager(str(tmp_path), read_only=True)
  assert manager.all_steps() == [2]  # step 4's checkpoint was never written
