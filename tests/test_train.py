"""End to end: train, checkpoint, SIGKILL, resume on the same trajectory, evaluate; and
2 processes x 4 CPU devices against 1 process x 8 devices."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from detr_jax import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny DETR on a small synthetic set: compiles and trains a step in seconds on CPU.
OVERRIDES = {
  "model.backbone": "resnet18",
  "model.hidden_dim": 32,
  "model.num_heads": 2,
  "model.dim_feedforward": 64,
  "model.num_encoder_layers": 1,
  "model.num_decoder_layers": 2,
  "model.num_queries": 8,
  "image_size": "(64,64)",
  "batch_size": 8,
  "eval_batch_size": 8,
  "data.synthetic_num_train": 64,
  "data.synthetic_num_eval": 12,
  "data.synthetic_image_size": "(64,64)",
  "data.max_boxes": 8,
  "num_train_steps": 8,
  "checkpoint_every_steps": 2,
  "log_every_steps": 1,
  "eval_every_steps": 8,
  "num_eval_images_to_draw": 2,
}


# Later launches of the same program reuse the compiled steps (JAX's persistent cache).
CACHE_ENV = {
  "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "detr_jax_test_cache"),
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def _run(workdir, overrides=None, devices=1, extra=(), wait=True, **popen):
  args = [sys.executable, "train.py", "--config", "configs/tiny.py", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in {**OVERRIDES, **(overrides or {})}.items()]
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    **CACHE_ENV,
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
  assert proc.returncode == 0, out[-4000:]
  return out


def _losses(workdir):
  return trainer.read_scalars(workdir, "train/loss")


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_train_kill_resume_follows_same_trajectory_and_evaluates(tmp_path):
  full = str(tmp_path / "full")
  _run(full)
  ref = _losses(full)
  assert sorted(ref) == list(range(1, 9))
  assert all(np.isfinite(v) for v in ref.values())
  metrics = json.load(open(os.path.join(full, "eval", "step_8_metrics.json")))
  assert metrics["num_images"] == 12 and 0.0 <= metrics["AP50"] <= 1.0

  # Kill -9 as soon as the step-4 checkpoint is complete, then resume.
  killed = str(tmp_path / "killed")
  proc = _run(killed, wait=False, start_new_session=True)
  deadline = time.time() + 300
  while 4 not in _steps(killed) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, "training ended before it could be killed"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  resumed_from = max(_steps(killed))
  assert 4 <= resumed_from < 8
  out = _run(killed)
  assert f"Resumed from step {resumed_from}" in out
  got = _losses(killed)
  for step in range(resumed_from + 1, 9):
    np.testing.assert_allclose(got[step], ref[step], rtol=1e-5, err_msg=f"step {step}")

  # eval.py on the resumed run's last checkpoint gives the training run's final eval.
  env = dict(os.environ, JAX_PLATFORMS="cpu", **CACHE_ENV)
  subprocess.run(
    [sys.executable, "eval.py", f"--workdir={killed}"],
    cwd=REPO,
    env=env,
    check=True,
    capture_output=True,
  )
  evaluated = json.load(open(os.path.join(killed, "eval", "step_8_metrics.json")))
  assert set(evaluated) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
  np.testing.assert_allclose(evaluated["AP"], metrics["AP"], atol=1e-6)
  dets = json.load(open(os.path.join(killed, "eval", "step_8_detections.json")))
  assert len(dets) == 12 * 8 and {d["image_id"] for d in dets} == set(
    d["image_id"] for d in json.load(open(os.path.join(full, "eval", "step_8_detections.json")))
  )


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


def test_two_processes_match_one_process(tmp_path):
  steps = {"num_train_steps": 3, "eval_every_steps": 3, "checkpoint_every_steps": 3}
  single = str(tmp_path / "single")
  _run(single, steps, devices=8)
  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [
    _run(
      multi,
      steps,
      devices=4,
      wait=False,
      extra=[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
    )
    for i in range(2)
  ]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-4000:]
  ref, got = _losses(single), _losses(multi)
  assert sorted(ref) == sorted(got) == [1, 2, 3]
  for step in ref:
    np.testing.assert_allclose(got[step], ref[step], rtol=1e-5, err_msg=f"step {step}")
  # Evaluation over two hosts sees every image exactly once and scores like one host.
  load = lambda d, what: json.load(open(os.path.join(d, "eval", f"step_3_{what}.json")))
  m_single, m_multi = load(single, "metrics"), load(multi, "metrics")
  assert m_single["num_images"] == m_multi["num_images"] == 12
  np.testing.assert_allclose(m_multi["AP"], m_single["AP"], atol=1e-4)
  ids = lambda d: sorted({r["image_id"] for r in load(d, "detections")})
  assert ids(multi) == ids(single) and len(load(multi, "detections")) == 12 * 8


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
