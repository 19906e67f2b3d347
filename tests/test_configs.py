"""Tests of `configs/`: every field can be overridden on the command line, parsed by
ml_collections' config_flags exactly as `train.py` defines its --config flag."""

import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from detr_jax import config_utils

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


def test_conditional_detr_recipe_and_its_group_detr_variants():
  config = parse("configs/coco_conditional_50ep.py")
  m, loss = config.model, config.loss
  assert (m.decoder, m.classifier, m.num_queries, m.groups) == ("conditional", "sigmoid", 300, 1)
  assert (loss.class_weight, loss.bbox_weight, loss.giou_weight) == (2.0, 5.0, 2.0)
  assert (loss.cost_class, loss.cost_bbox, loss.cost_giou) == (2.0, 5.0, 2.0)
  assert (config.batch_size, config.num_epochs, config.lr_drop_epochs) == (16, 50, 40)
  assert config.learning_rate * config.backbone_lr_mult == pytest.approx(1e-5)
  group = parse("configs/coco_conditional_50ep.py:group")
  assert group.model.groups == 11 and group.num_epochs == 50
  short = parse("configs/coco_conditional_50ep.py:group_12ep", "--config.model.groups=3")
  assert (short.model.groups, short.num_epochs, short.lr_drop_epochs) == (3, 12, 11)


def test_tiny_variants_combine():
  config = parse("configs/tiny.py:conditional,group,harder")
  assert (config.model.decoder, config.model.groups, config.model.num_queries) == (
    "conditional",
    11,
    20,
  )
  assert config.model.pre_norm is False and config.data.synthetic_object_size == (0.08, 0.25)
  plain = parse("configs/tiny.py")
  assert (plain.model.decoder, plain.model.groups, plain.model.pre_norm) == ("detr", 1, True)
  with pytest.raises(ValueError, match=r"Unknown variant\(s\) \['conditinal'\]"):
    config_utils.load_config_file(os.path.join(REPO, "configs/tiny.py:conditinal"))


def test_tiny_mask_stages_share_the_box_model():
  """Stage 2 (`init_from` stage 1) must build stage 1's box model plus the head; the joint
  `masks` variant is the same model."""
  stage1, stage2 = parse("configs/tiny.py:masks_stage1"), parse("configs/tiny.py:masks_stage2")
  joint = parse("configs/tiny.py:masks")
  head_fields = {"masks", "train_only_mask_head"}
  box = lambda c: {k: v for k, v in c.model.to_dict().items() if k not in head_fields}
  assert box(stage1) == box(stage2) == box(joint) and stage1.model.num_heads == 8
  assert not stage1.model.masks and not stage1.data.masks
  assert stage2.model.masks and stage2.model.train_only_mask_head and stage2.data.masks
  assert joint.model.masks and not joint.model.train_only_mask_head
