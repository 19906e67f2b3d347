"""Tests of `configs/`: every field can be overridden on the command line, parsed by
ml_collections' config_flags exactly as `train.py` defines its --config flag."""

import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(config_file, *overrides):
  """The config that `train.py --config=config_file *overrides` runs with."""
  argv = ["train.py", f"--config={os.path.join(REPO, config_file)}", *overrides]
  flag_values = flags.FlagValues()
  # As train.py defines it; `sys_argv` stands for the command line, from which config_flags
  # learns the config file's fields before parsing.
  config_flags.DEFINE_config_file(
    "config", None, "Config file.", flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


def leaves(config, prefix=""):
  """(dotted name, value) of every field."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def other_value(value):
  """A value of the same type that differs from `value`, and how the command line writes it."""
  if isinstance(value, bool):
    return (not value), str(not value)
  if isinstance(value, (int, float)):
    return value + 1, repr(value + 1)
  if isinstance(value, str):
    return value + "x", value + "x"
  if isinstance(value, tuple):
    return value[:1], repr(value[:1])
  raise TypeError(f"no command-line form for {value!r}")


def test_every_base_field_can_be_overridden_once():
  defaults = dict(leaves(parse("configs/base.py")))
  assert defaults and all(v is not None for v in defaults.values()), defaults
  wanted, args = {}, []
  for name, value in defaults.items():
    wanted[name], text = other_value(value)
    args.append(f"--config.{name}={text}")
  got = dict(leaves(parse("configs/base.py", *args)))
  assert got == wanted


@pytest.mark.parametrize("config_file", ["configs/coco_500ep.py", "configs/voc.py"])
def test_readme_data_dir_override(config_file, tmp_path):
  config = parse(config_file, f"--config.data.data_dir={tmp_path}")
  assert config.data.data_dir == str(tmp_path)
  assert parse(config_file).data.data_dir == ""  # TFDS's default
  assert config.data.prepare_missing is False
  assert parse(config_file, "--config.data.prepare_missing=True").data.prepare_missing is True
