"""detr_jax/checkpoint.py: which config fields a resume may change, damaged checkpoints
(detected, skipped, moved aside), and failed saves (a full disk) that name their step."""

import errno
import json
import os
import shutil
import subprocess

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base, tiny
from detr_jax import checkpoint, config_utils, models, optim, runtime

SMALL_MODEL = [
  "model.hidden_dim=32",
  "model.num_heads=2",
  "model.dim_feedforward=32",
  "model.num_encoder_layers=1",
  "model.num_decoder_layers=1",
  "model.num_queries=4",
  "image_size=(64,64)",
]


def _config(*overrides):
  return config_utils.apply_overrides(tiny.get_config(), SMALL_MODEL + list(overrides))


def _abstract_state(config):
  """{path: shape} of the variables and optimizer state a config's checkpoints hold."""
  variables = models.abstract_variables(models.build_model(config.model))
  tx, _ = optim.create_optimizer_from_config(variables["params"], config, steps_per_epoch=10)
  state = {"variables": variables, "opt_state": jax.eval_shape(tx.init, variables["params"])}
  return checkpoint._shapes(state)


# ---- Which fields a resume may change ------------------------------------------------------


def test_fields_that_may_change_on_resume_change_no_saved_array():
  """The oracle is the state itself: every model field a resume may change gives the same
  saved arrays (variables and optimizer state); the fields named fixed below change them."""
  reference = _abstract_state(_config())
  for field, value in [
    ("dtype", "bfloat16"),
    ("remat", True),
    ("attention", "xla"),
    ("conv", "xla"),
    ("dropout", 0.5),
    ("backbone_weights", "elsewhere.pth"),
  ]:
    assert not checkpoint.fixed_field(f"model.{field}")
    assert _abstract_state(_config(f"model.{field}={value!r}")) == reference, field
  for field, value in [
    ("hidden_dim", 64),
    ("pre_norm", False),
    ("backbone_trainable", ("layer4",)),  # the optimizer state's parameter groups
  ]:
    assert checkpoint.fixed_field(f"model.{field}")
    assert _abstract_state(_config(f"model.{field}={value!r}")) != reference, field
  for field in ("num_queries", "num_classes", "backbone", "num_decoder_layers", "dilation"):
    assert checkpoint.fixed_field(f"model.{field}")
  # Every other section changes no saved array: the schedule, the loss, the data, intervals.
  for name in ("num_train_steps", "learning_rate", "loss.aux_loss", "data.data_dir", "fsdp"):
    assert not checkpoint.fixed_field(name)
  assert _abstract_state(_config("learning_rate=0.5", "grad_clip_norm=0.0")) == reference
  # A field added to configs/base.py under model. is fixed unless listed as resumable.
  model_fields = set(base.get_model_config().keys())
  assert checkpoint.RESUMABLE_MODEL_FIELDS <= model_fields


def _workdir_with_checkpoint(tmp_path, config):
  workdir = str(tmp_path / "run")
  checkpoint.save_config(workdir, config)
  os.makedirs(os.path.join(workdir, "checkpoints", "4"))
  return workdir


def test_resume_config_lists_every_fixed_field_and_changes_nothing(tmp_path):
  workdir = _workdir_with_checkpoint(tmp_path, _config())
  before = open(os.path.join(workdir, "config.json")).read()
  given = _config("model.hidden_dim=64", "model.backbone='resnet34'", "num_train_steps=7")
  with pytest.raises(runtime.UserError) as e:
    checkpoint.check_resume_config(workdir, given)
  text = str(e.value)
  assert "model.hidden_dim: 32 (saved) vs 64 (given)" in text
  assert "model.backbone: 'resnet18' (saved) vs 'resnet34' (given)" in text
  assert "num_train_steps" not in text and f"--config.init_from={workdir}" in text
  assert open(os.path.join(workdir, "config.json")).read() == before
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json"]


def test_resume_config_returns_the_changes_that_may_happen(tmp_path):
  workdir = _workdir_with_checkpoint(tmp_path, _config())
  given = _config("num_train_steps=7", "model.dtype='bfloat16'", "data.data_dir='/d'")
  changes = checkpoint.check_resume_config(workdir, given)
  assert sorted(changes) == [
    ("data.data_dir", "", "/d"),
    ("model.dtype", "float32", "bfloat16"),
    ("num_train_steps", -1, 7),
  ]
  # Recorded: config.json becomes the new segment's, the history gains a line.
  checkpoint.record_config(workdir, given, 4, changes)
  assert checkpoint.load_config(workdir).num_train_steps == 7
  (line,) = open(os.path.join(workdir, checkpoint.CONFIG_HISTORY_FILE)).read().splitlines()
  segment = json.loads(line)
  assert segment["start_step"] == 4 and segment["changes"]["num_train_steps"] == [-1, 7]
  # Without checkpoints nothing is compared: a fresh run may write any config.
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  assert checkpoint.check_resume_config(workdir, _config("model.hidden_dim=64")) == []


# ---- Damaged checkpoints -------------------------------------------------------------------

PARAMS = {"a": np.arange(1000, dtype=np.float32), "b": {"c": np.ones((3, 4), np.float32)}}


def _targets():
  variables = {"params": jax.tree.map(jnp.asarray, PARAMS), "batch_stats": {}}
  opt_state = optax.adam(1e-3).init(variables["params"])
  return variables, opt_state


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
  """A workdir with intact checkpoints 2, 4 and 6 of small arrays (step s: PARAMS + s)."""
  workdir = str(tmp_path_factory.mktemp("intact"))
  manager = checkpoint.create_manager(workdir, async_save=False)
  variables, opt_state = _targets()
  for step in (2, 4, 6):
    shifted = jax.tree.map(lambda x, s=step: x + s, variables)
    checkpoint.save(manager, step, variables=shifted, opt_state=opt_state, meta={"step": step})
  manager.close()
  return workdir


def _copy(three_steps, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(three_steps, workdir)
  return workdir


def _damage(directory, mode):
  """Damages a checkpoint directory as a partial copy or a bad disk would."""
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      if (
        mode == "truncated"
        or (mode == "data" and f"{os.sep}d{os.sep}" in path)
        or (mode == "metadata" and name == "_METADATA")
      ):
        os.truncate(path, os.path.getsize(path) // 2)
  if mode == "missing_item":
    shutil.rmtree(os.path.join(directory, "variables"))
  if mode == "meta_json":
    with open(os.path.join(directory, "meta", "metadata"), "w") as f:
      f.write('{"step": ')


def _restore(manager, step):
  variables, opt_state = _targets()
  return checkpoint.restore(manager, step, variables=variables, opt_state=opt_state)


@pytest.mark.parametrize("mode", ["truncated", "data", "metadata", "missing_item", "meta_json"])
def test_damaged_newest_is_named_skipped_and_moved_aside(three_steps, tmp_path, mode):
  workdir = _copy(three_steps, tmp_path)
  _damage(os.path.join(workdir, "checkpoints", "6"), mode)
  manager = checkpoint.create_manager(workdir)
  with pytest.raises(checkpoint.DamagedCheckpoint) as e:
    _restore(manager, 6)
  assert e.value.step == 6 and e.value.path == os.path.join(workdir, "checkpoints", "6")
  assert "\n" not in str(e.value) and e.value.reason
  restored, step, damaged = checkpoint.restore_newest(manager, lambda s: _restore(manager, s))
  assert step == 4 and [d.step for d in damaged] == [6]
  np.testing.assert_array_equal(restored["variables"]["params"]["a"], PARAMS["a"] + 4)
  checkpoint.move_aside(manager, damaged)
  assert manager.all_steps() == [2, 4]
  moved = os.path.join(workdir, checkpoint.DAMAGED_DIR, "6")
  assert "cannot be read" in open(os.path.join(moved, "REASON.txt")).read()
  manager.close()


def test_other_arrays_than_the_config_are_an_error_not_damage(three_steps, tmp_path):
  workdir = _copy(three_steps, tmp_path)
  manager = checkpoint.create_manager(workdir, read_only=True)
  variables, opt_state = _targets()
  variables["params"]["a"] = jnp.zeros(10)
  with pytest.raises(runtime.UserError, match=r"params\.a: saved \(1000,\) vs given \(10,\)"):
    checkpoint.restore_newest(
      manager, lambda s: checkpoint.restore(manager, s, variables=variables)
    )
  assert manager.all_steps() == [2, 4, 6]


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(three_steps, tmp_path):
  workdir = _copy(three_steps, tmp_path)
  for step in (2, 4, 6):
    _damage(os.path.join(workdir, "checkpoints", str(step)), "truncated")
  manager = checkpoint.create_manager(workdir, read_only=True)
  with pytest.raises(runtime.UserError, match="No checkpoint in .* can be read") as e:
    checkpoint.restore_newest(manager, lambda s: _restore(manager, s))
  assert all(f"Checkpoint step {s} " in str(e.value) for s in (2, 4, 6))
  assert manager.all_steps() == [2, 4, 6]


def test_restore_model_uses_the_newest_intact_and_refuses_a_damaged_step(tmp_path):
  """What eval.py and predict.py call."""
  config = _config()
  abstract = models.abstract_variables(models.build_model(config.model))
  workdir = str(tmp_path / "model")
  written = {}
  for step in (2, 4):
    leaves, tree = jax.tree.flatten(abstract)
    rng = np.random.default_rng(step)
    written[step] = tree.unflatten([rng.normal(size=a.shape).astype(a.dtype) for a in leaves])
    checkpoint.write_variables(workdir, written[step], config, step=step)
  _damage(os.path.join(workdir, "checkpoints", "4"), "truncated")
  _, variables, step = checkpoint.restore_model(workdir, config)
  assert step == 2
  flat = flax.traverse_util.flatten_dict(variables)
  for key, value in flax.traverse_util.flatten_dict(written[2]).items():
    np.testing.assert_array_equal(np.asarray(flat[key]), value)
  with pytest.raises(runtime.UserError, match="^Checkpoint step 4 .* cannot be read: ") as e:
    checkpoint.restore_model(workdir, config, step=4)
  assert "\n" not in str(e.value)
  with pytest.raises(checkpoint.CheckpointNotFound, match=r"No checkpoint 9 .*have \[2, 4\]"):
    checkpoint.restore_model(workdir, config, step=9)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))  # eval never moves anything


# ---- Failed saves --------------------------------------------------------------------------


def test_is_disk_full():
  assert checkpoint.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
  assert checkpoint.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
  assert checkpoint.is_disk_full(
    ValueError("RESOURCE_EXHAUSTED: Error writing ... [os_error_code='28']")
  )
  assert not checkpoint.is_disk_full(OSError(errno.EACCES, "Permission denied"))
  assert not checkpoint.is_disk_full(ValueError("Requested shape: (64,) is not compatible"))


class _FailingManager:
  """A manager whose async save of step `fail` fails, reported at the next wait."""

  def __init__(self, directory, fail, error):
    self.directory, self._fail, self._error, self._pending = directory, fail, error, None

  def save(self, step, args, force):
    self._pending = step

  def wait_until_finished(self):
    step, self._pending = self._pending, None
    if step == self._fail:
      raise self._error
    if step is not None:
      os.makedirs(os.path.join(self.directory, str(step)))

  def close(self):
    pass


def _save(writer, step):
  writer.save(step, variables={}, opt_state=None, meta={"step": step}, force=False)


def test_writer_names_the_failed_step(tmp_path):
  directory = str(tmp_path / "checkpoints")
  full = ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")
  writer = checkpoint.Writer(_FailingManager(directory, 6, full))
  for step in (2, 4, 6):
    _save(writer, step)
  with pytest.raises(runtime.UserError) as e:
    _save(writer, 8)  # step 6's failure surfaces here
  assert str(e.value).startswith(
    f"Out of disk space while saving checkpoint step 6 to {directory}/6 (ValueError: "
  )
  assert "earlier checkpoints (steps [2, 4]) are intact" in str(e.value)
  assert "resume from step 4" in str(e.value)
  # Another failure keeps its type and gains the step and path.
  writer = checkpoint.Writer(_FailingManager(str(tmp_path / "other"), 2, KeyError("boom")))
  _save(writer, 2)
  with pytest.raises(KeyError) as e:
    writer.close()
  assert f"while saving checkpoint step 2 to {tmp_path}/other/2" in e.value.__notes__


@pytest.fixture
def small_filesystem(tmp_path):
  """A 512 KiB tmpfs (needs root, else the test is skipped); unmounted afterwards."""
  path = str(tmp_path / "small")
  os.makedirs(path)
  if os.geteuid() != 0:
    pytest.skip("mounting a small filesystem needs root (the injected failure is in test_train)")
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", path])
  if mounted.returncode:
    pytest.skip("cannot mount a tmpfs here")
  yield path
  subprocess.run(["umount", path], check=True)


def test_a_real_full_disk_keeps_the_earlier_checkpoints(small_filesystem):
  manager = checkpoint.create_manager(small_filesystem, max_to_keep=2)
  writer = checkpoint.Writer(manager)
  small = {"params": {"a": jnp.arange(100.0)}, "batch_stats": {}}
  for step in (2, 4):
    writer.save(step, variables=small, opt_state=None, meta={"step": step}, force=False)
  noise = np.random.default_rng(0).normal(size=200_000).astype(np.float32)  # 800 KB
  big = {"params": {"a": jnp.asarray(noise)}, "batch_stats": {}}
  with pytest.raises(runtime.UserError) as e:  # raised by the save or, async, by the wait
    writer.save(6, variables=big, opt_state=None, meta={"step": 6}, force=False)
    writer.close()
  manager.close()
  text = str(e.value)
  assert "Out of disk space while saving checkpoint step 6 to " in text
  assert os.path.join(small_filesystem, "checkpoints", "6") in text and "[2, 4]" in text
  manager = checkpoint.create_manager(small_filesystem, read_only=True)
  assert manager.all_steps() == [2, 4]
  restored = checkpoint.restore(manager, 4, variables=small)
  np.testing.assert_array_equal(restored["variables"]["params"]["a"], np.arange(100.0))
