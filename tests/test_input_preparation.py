"""Tests of `input_pipeline.preparation`: the start-up check of the TFDS data a config reads,
its message, and the opt-in preparation (with a small TFDS builder made here, which TFDS
prepares without the network)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import input_pipeline
from configs import base, coco_500ep, voc
from input_pipeline import sources

pytestmark = pytest.mark.usefixtures("fresh_sources")


class DetrTinyVoc(tfds.core.GeneratorBasedBuilder):
  """VOC's features, 3 train and 2 test images of one person each: a dataset that TFDS
  prepares in a second without downloading anything."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    objects = tfds.features.Sequence(
      dict(
        bbox=tfds.features.BBoxFeature(),
        label=tfds.features.ClassLabel(names=sources.VOC_NAMES),
        is_difficult=np.bool_,
      )
    )
    features = tfds.features.FeaturesDict(
      {
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/filename": tfds.features.Text(),
        "objects": objects,
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {
      "train": self._generate_examples("train", 3),
      "test": self._generate_examples("test", 2),
    }

  def _generate_examples(self, split, n):
    for i in range(n):
      image = np.full((32, 48, 3), 40 * i, np.uint8)
      box = tfds.features.BBox(ymin=0.25, xmin=0.25, ymax=0.75, xmax=0.5)
      objects = dict(bbox=[box], label=["person"], is_difficult=[False])
      yield f"{split}{i}", {"image": image, "image/filename": f"{split}{i}.jpg", "objects": objects}


class DetrTinyManual(DetrTinyVoc):
  """The same, as a dataset whose files TFDS cannot download itself."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = "Download tiny.zip from example.org by hand."


def tiny_config(data_dir, name="detr_tiny_voc", **overrides):
  cfg = base.get_data_config()
  cfg.update(
    dict(
      name="voc",
      data_dir=str(data_dir),
      voc_train_splits=(f"{name}:train",),
      voc_eval_split=f"{name}:test",
      max_boxes=4,
    )
  )
  cfg.update(overrides)
  return cfg


def message(cfg, **kwargs):
  """The text of the `DatasetNotPrepared` that `check_prepared(cfg, **kwargs)` raises."""
  with pytest.raises(input_pipeline.DatasetNotPrepared) as e:
    input_pipeline.check_prepared(cfg, **kwargs)
  return str(e.value)


def command_in(text):
  """The Python code of the `python -c "..."` command in a message."""
  (code,) = re.findall(r'python -c "(.*)"', text)
  return code


# ---------------------------------------------------------------------------------------------
# The message, with an empty data_dir: nothing is read or downloaded.
# ---------------------------------------------------------------------------------------------
def test_missing_coco_says_what_where_how_and_how_big(tmp_path, no_network):
  cfg = coco_500ep.get_config().data
  cfg.data_dir = str(tmp_path)
  text = message(cfg)
  assert f"coco/2017, version 1.1.0, is not prepared in {tmp_path} (data.data_dir)" in text
  assert f"there is no {tmp_path}/coco/2017/1.1.0" in text
  assert "'train' (data.coco_train_split) and 'validation' (data.coco_eval_split)" in text
  assert "25.20 GiB to download" in text
  assert f"tfds.builder('coco/2017:1.1.0', data_dir='{tmp_path}').download_and_prepare()" in text
  assert f"tfds build coco/2017:1.1.0 --data_dir={tmp_path}" in text
  assert "--config.data.prepare_missing=True" in text
  assert "--config.data.data_dir=DIR" in text and "--override data.data_dir=DIR" in text
  assert "Traceback" not in text
  assert not any(tmp_path.iterdir())  # the check wrote nothing


def test_missing_coco_panoptic_says_what_and_how_big(tmp_path, no_network):
  cfg = base.get_data_config()
  cfg.update(name="coco_panoptic", data_dir=str(tmp_path))
  text = message(cfg)
  assert f"coco/2017_panoptic, version 1.1.0, is not prepared in {tmp_path}" in text
  assert "'train' (data.coco_train_split) and 'validation' (data.coco_eval_split)" in text
  assert "Size: 19.57 GiB to download, 19.63 GiB prepared." in text
  assert f"tfds.builder('coco/2017_panoptic:1.1.0', data_dir='{tmp_path}')" in text


def test_missing_voc_names_both_years(tmp_path, no_network):
  cfg = voc.get_config().data
  cfg.data_dir = str(tmp_path)
  text = message(cfg)
  assert "voc/2007, version 5.0.0" in text and "voc/2012, version 5.0.0" in text
  assert "'train+validation' (data.voc_train_splits) and 'test' (data.voc_eval_split)" in text
  assert "868.85 MiB to download, 837.73 MiB prepared" in text
  assert "3.59 GiB to download, 2.44 GiB prepared" in text
  assert f"tfds build voc/2012:5.0.0 --data_dir={tmp_path}" in text


def test_an_empty_data_dir_field_is_tfds_default_and_other_sources_need_nothing(
  tmp_path, monkeypatch, no_network
):
  # TFDS's default data_dir (from $TFDS_DATA_DIR at import, else ~/tensorflow_datasets).
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
  cfg = coco_500ep.get_config().data
  assert cfg.data_dir == ""
  text = message(cfg)
  assert f"not prepared in {tmp_path} (TFDS's default" in text and "data.data_dir is empty" in text
  for name in ("synthetic", "coco_folder"):
    cfg.name = name
    input_pipeline.check_prepared(cfg)  # no TFDS data to check
    input_pipeline.ensure_prepared(cfg, is_coordinator=True, barrier=pytest.fail)


def test_missing_manual_dataset_gives_the_manual_steps(tmp_path, no_network):
  text = message(tiny_config(tmp_path, "detr_tiny_manual"))
  assert "TFDS cannot download it itself: Download tiny.zip from example.org by hand." in text
  assert f"{tmp_path}/downloads/manual" in text
  assert "unknown (see https://www.tensorflow.org/datasets/catalog/detr_tiny_manual)" in text


def test_prepared_dataset_without_the_split(tmp_path, no_network):
  cfg = tiny_config(tmp_path)
  exec(command_in(message(cfg)))  # the command the message gives prepares the dataset
  input_pipeline.check_prepared(cfg)
  cfg.voc_eval_split = "detr_tiny_voc:validation"
  text = message(cfg)
  assert "has the splits 'test', 'train'" in text
  assert "'validation' (data.voc_eval_split)" in text


def test_evaluation_needs_only_the_eval_split(tmp_path, no_network):
  cfg = voc.get_config().data
  cfg.data_dir = str(tmp_path)
  text = message(cfg, train=False)
  assert "voc/2007" in text and "voc/2012" not in text and "'train+validation'" not in text

  # Training data that is not there does not stop an evaluation.
  cfg = tiny_config(tmp_path, voc_train_splits=("detr_tiny_manual:train",))
  tfds.builder("detr_tiny_voc", data_dir=str(tmp_path)).download_and_prepare()
  input_pipeline.check_prepared(cfg, train=False)
  assert "detr_tiny_manual" in message(cfg)
  info = input_pipeline.get_dataset_info(cfg)
  assert len(info.coco_gt["images"]) == info.num_eval_examples == 2
  batches = input_pipeline.create_eval_iterator(
    cfg, image_size=(32, 48), global_batch_size=2, process_index=0, process_count=1
  )
  assert [int(b["mask"].sum()) for b in batches] == [2]


# ---------------------------------------------------------------------------------------------
# data.prepare_missing: process 0 prepares, every process waits at the barrier, then checks.
# ---------------------------------------------------------------------------------------------
def test_prepare_missing_on_the_coordinator_then_read(tmp_path, monkeypatch, no_network):
  prepared = []
  original = tfds.core.DatasetBuilder.download_and_prepare

  def download_and_prepare(builder, *args, **kwargs):
    prepared.append(builder.info.full_name)
    return original(builder, *args, **kwargs)

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
  barriers = []
  barrier = lambda: barriers.append(1)

  # Off (the default): the check alone, no barrier.
  cfg = tiny_config(tmp_path)
  assert base.get_data_config().prepare_missing is False
  with pytest.raises(input_pipeline.DatasetNotPrepared):
    input_pipeline.ensure_prepared(cfg, is_coordinator=True, barrier=barrier)
  assert (prepared, barriers) == ([], [])

  # On: another process does not prepare; it waits, then finds nothing (as a process that
  # does not see process 0's data_dir would).
  cfg.prepare_missing = True
  with pytest.raises(input_pipeline.DatasetNotPrepared):
    input_pipeline.ensure_prepared(cfg, is_coordinator=False, barrier=barrier)
  assert (prepared, barriers) == ([], [1])
  input_pipeline.ensure_prepared(cfg, is_coordinator=True, barrier=barrier)
  assert (prepared, barriers) == (["detr_tiny_voc/1.0.0"], [1, 1])
  input_pipeline.ensure_prepared(cfg, is_coordinator=False, barrier=barrier)
  input_pipeline.ensure_prepared(cfg, is_coordinator=True, barrier=barrier)  # nothing to do
  assert (prepared, barriers) == (["detr_tiny_voc/1.0.0"], [1, 1, 1, 1])

  info = input_pipeline.get_dataset_info(cfg)
  assert (info.num_train_examples, info.num_eval_examples) == (3, 2)
  batches = input_pipeline.create_eval_iterator(
    cfg, image_size=(32, 48), global_batch_size=2, process_index=0, process_count=1
  )
  (batch,) = list(batches)
  assert batch["labels"][:, 0].tolist() == [14, 14] and batch["valid"].sum() == 2
  np.testing.assert_allclose(batch["boxes"][0, 0], [0.375, 0.5, 0.25, 0.5], atol=1e-6)


def test_a_failed_preparation_still_releases_the_other_processes(tmp_path, monkeypatch):
  def fail(builder, *args, **kwargs):
    raise tf.errors.UnavailableError(None, None, "no network")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  barriers = []
  cfg = tiny_config(tmp_path, prepare_missing=True)
  with pytest.raises(tf.errors.UnavailableError):
    input_pipeline.ensure_prepared(cfg, is_coordinator=True, barrier=lambda: barriers.append(1))
  assert barriers == [1]


# ---------------------------------------------------------------------------------------------
# The entry points: the message alone, exit status 1, before anything is built.
# ---------------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run(
    [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )


def test_train_and_eval_commands_print_the_message_without_a_traceback(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  workdir = tmp_path / "run"
  train = _cli(
    "train.py",
    "--config=configs/coco_500ep.py",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
  )
  assert train.returncode == 1, train.stderr[-2000:]
  assert f"coco/2017, version 1.1.0, is not prepared in {data_dir}" in train.stderr
  assert "Traceback" not in train.stderr + train.stdout
  assert not workdir.exists()  # stopped before writing anything

  # eval.py on a workdir whose config reads voc: the same check, for the eval split.
  workdir.mkdir()
  config = voc.get_config()
  config.data.data_dir = "/nonexistent"
  (workdir / "config.json").write_text(config.to_json_best_effort())
  ev = _cli("eval.py", f"--workdir={workdir}", f"--override=data.data_dir={data_dir}")
  assert ev.returncode == 1, ev.stderr[-2000:]
  assert f"voc/2007, version 5.0.0, is not prepared in {data_dir}" in ev.stderr
  assert "Traceback" not in ev.stderr + ev.stdout
