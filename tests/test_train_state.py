"""detr_jax/train_state.py: where a run's first state comes from (fresh random, ImageNet
backbone from a file or URL, resumed) and that resuming never fetches weights."""

import flax
import numpy as np
import pytest
import torch
import torch_detr

from configs import tiny
from detr_jax import checkpoint, config_utils, convert, pretrained, sharding, train_state
from detr_jax import train_step as step_lib

OVERRIDES = [
  "model.hidden_dim=32",
  "model.num_heads=2",
  "model.dim_feedforward=32",
  "model.num_encoder_layers=1",
  "model.num_decoder_layers=1",
  "model.num_queries=4",
  "image_size=(64,64)",
]


def _setup(tmp_path, backbone_weights):
  config = config_utils.apply_overrides(
    tiny.get_config(), OVERRIDES + [f"model.backbone_weights={backbone_weights!r}"]
  )
  mesh = sharding.create_mesh()
  model, tx, _ = step_lib.from_config(config, mesh, steps_per_epoch=10)
  manager = checkpoint.create_manager(str(tmp_path / "run"), async_save=False)
  return config, mesh, model, tx, manager


def _backbone(variables):
  flat = flax.traverse_util.flatten_dict(variables)
  return {k: np.asarray(v) for k, v in flat.items() if k[1] == "backbone"}


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  """A torchvision-layout ResNet-18 checkpoint written by torch.save."""
  state_dict, _ = torch_detr.torchvision_resnet18(seed=3)
  path = tmp_path_factory.mktemp("weights") / "resnet18-random.pth"
  torch.save(state_dict, path)
  return str(path), state_dict


def test_fresh_state_takes_the_backbone_file_and_resume_never_fetches(tmp_path, resnet18_file):
  path, state_dict = resnet18_file
  config, mesh, model, tx, manager = _setup(tmp_path, path)
  state, step = train_state.initial_state(config, model, tx, mesh, manager, None)
  assert step == 0 and int(state["step"]) == 0
  got = _backbone(state["variables"])
  zeros = {
    k: np.zeros_like(v)
    for k, v in flax.traverse_util.flatten_dict(
      train_state.random_variables(model, config, sharding.replicated(mesh))
    ).items()
  }
  expected = _backbone(
    convert.torchvision_resnet_to_flax(
      {k: v.numpy() for k, v in state_dict.items()},
      flax.traverse_util.unflatten_dict(zeros),
      config.model,
    )
  )
  assert got.keys() == expected.keys() and len(got) > 40
  for key in got:
    np.testing.assert_array_equal(got[key], expected[key], err_msg="/".join(key))
  # The rest is the seed's random init, as without backbone weights.
  config0, _, model0, tx0, manager0 = _setup(tmp_path / "random", "")
  random_state, _ = train_state.initial_state(config0, model0, tx0, mesh, manager0, None)
  flat = flax.traverse_util.flatten_dict(state["variables"])
  flat0 = flax.traverse_util.flatten_dict(random_state["variables"])
  for key in flat:
    if key[1] != "backbone":
      np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(flat0[key]))
  assert not any(np.array_equal(got[k], np.asarray(flat0[k])) for k in got if got[k].size > 1)

  # Saved, then resumed with weights that cannot be fetched: nothing is fetched.
  checkpoint.save(
    manager, 5, variables=state["variables"], opt_state=state["opt_state"], meta={"step": 5}
  )
  manager.wait_until_finished()
  config.model.backbone_weights = "http://127.0.0.1:9/unreachable-00000000.pth"
  resumed, step = train_state.initial_state(config, model, tx, mesh, manager, None)
  assert step == 5 and _backbone(resumed["variables"]).keys() == got.keys()


def test_unreachable_backbone_weights_fail_with_the_way_out(tmp_path):
  config, mesh, model, tx, manager = _setup(tmp_path, "http://127.0.0.1:9/resnet18-f37072fd.pth")
  config.weights_cache_dir = str(tmp_path / "cache")
  with pytest.raises(pretrained.FetchError) as e:
    train_state.initial_state(config, model, tx, mesh, manager, None)
  text = str(e.value)
  assert "http://127.0.0.1:9/resnet18-f37072fd.pth" in text and "model.backbone_weights" in text
  assert str(tmp_path / "cache") in text
