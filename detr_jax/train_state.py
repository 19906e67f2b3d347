"""The training state: what it holds, how it is sharded, and where a run's first one comes from.

A state is a dict:
  variables  {"params", "batch_stats"}, what `model.apply` takes;
  opt_state  the optimizer's state;
  step       int32 scalar, steps done;
  bad_step   int32 scalar, the first step whose loss was not finite, or -1.

`initial_state` gives a run its first state, already sharded over the mesh: restored from the
workdir's latest checkpoint (resume), or fresh: from a pretrained workdir (`config.init_from`),
else random with the backbone's ImageNet weights (`config.model.backbone_weights`), or with
frozen BatchNorm statistics estimated from the first batch (`config.bn_init_from_data`).
Resuming and `init_from` never download anything.
"""

import hashlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from detr_jax import checkpoint, convert, models, pretrained, runtime, sharding


def abstract_state(model, tx):
  """The state's pytree as `jax.ShapeDtypeStruct`s (nothing is computed)."""
  variables = models.abstract_variables(model)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  return {
    "variables": variables,
    "opt_state": jax.eval_shape(tx.init, variables["params"]),
    "step": scalar,
    "bad_step": scalar,
  }


def state_shardings(abstract, mesh, fsdp):
  """Shardings of a state: variables and optimizer state replicated or FSDP-split, scalars
  replicated."""
  repl = sharding.replicated(mesh)
  return {
    "variables": sharding.param_sharding(abstract["variables"], mesh, fsdp=fsdp),
    "opt_state": sharding.param_sharding(abstract["opt_state"], mesh, fsdp=fsdp),
    "step": repl,
    "bad_step": repl,
  }


def random_variables(model, config, variable_shardings):
  """The model's random init from `config.seed`, created already sharded."""
  return jax.jit(
    lambda r: models.init_variables(model, r),
    out_shardings=variable_shardings,
  )(jax.random.key(config.seed))


def fresh_state(model, tx, config, shardings, variables=None):
  """A step-0 state from `variables`, or from the model's random init (`config.seed`)."""
  if variables is None:
    variables = random_variables(model, config, shardings["variables"])

  def init(variables):
    return {
      "variables": variables,
      "opt_state": tx.init(variables["params"]),
      "step": jnp.zeros((), jnp.int32),
      "bad_step": jnp.full((), -1, jnp.int32),
    }

  return jax.jit(init, out_shardings=shardings)(variables)


def initial_state(config, model, tx, mesh, manager, first_images):
  """The state a run starts from, and its step.

  Resumes from the newest checkpoint that can be read: newer damaged ones are logged and
  moved to `WORKDIR/checkpoints_damaged` (`checkpoint.restore_newest`, `move_aside`).

  Args:
    config: the run's full config. model, tx: its model and optimizer.
    mesh: the device mesh. manager: the workdir's `CheckpointManager`.
    first_images: `() -> [B, H, W, 3]` global array of the first training batch's images
      (called only for `config.bn_init_from_data` on a fresh run).

  Returns:
    (state sharded over `mesh`, the step it holds).
  """
  abstract = abstract_state(model, tx)
  shardings = state_shardings(abstract, mesh, config.fsdp)
  state, step, damaged = checkpoint.restore_newest(
    manager, lambda s: restore_state(manager, s, abstract, shardings)
  )
  if damaged:
    checkpoint.move_aside(manager, damaged)
  if step is not None:
    return state, step
  variables = None
  if config.init_from:
    random = random_variables(model, config, shardings["variables"])
    variables = jax.device_put(load_pretrained(config.init_from, random), shardings["variables"])
  elif config.model.backbone_weights:
    random = random_variables(model, config, shardings["variables"])
    variables = with_backbone_weights(random, config, model)
  elif config.bn_init_from_data:
    random = random_variables(model, config, shardings["variables"])
    variables = jax.jit(
      lambda v, x: models.calibrate_batch_norm(model, v, x), out_shardings=shardings["variables"]
    )(random, first_images())
    logging.info("Frozen BatchNorm statistics estimated from the first training batch")
  return fresh_state(model, tx, config, shardings, variables), 0


def with_backbone_weights(variables, config, model):
  """`variables` (sharded) with the backbone from `config.model.backbone_weights`.

  The file is fetched once per host (`pretrained.resolve_backbone_weights`: the torchvision
  ImageNet checkpoint, a local file or a URL, cached in `config.weights_cache_dir`), read
  without torch, and checked to be the same file on every process.
  """
  path = pretrained.resolve_backbone_weights(
    config.model.backbone_weights, config.model.backbone, config.weights_cache_dir or None
  )
  with open(path, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").digest()
  runtime.check_same_on_all_processes(digest, f"The backbone weights file {path}")
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), models.abstract_variables(model))
  loaded = flax.traverse_util.flatten_dict(
    convert.torchvision_resnet_to_flax(convert.load_torch_checkpoint(path), zeros, config.model)
  )
  flat = flax.traverse_util.flatten_dict(variables)
  for key, value in flat.items():
    if key[1] == "backbone":
      flat[key] = jax.device_put(loaded[key], value.sharding)
  logging.info("Backbone %s initialized from %s", config.model.backbone, path)
  return flax.traverse_util.unflatten_dict(flat)


def restore_state(manager, step, abstract, shardings):
  """The state saved at `step`, restored straight into `shardings`."""

  def target(name):
    with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    return jax.tree.map(with_sharding, abstract[name], shardings[name])

  restored = checkpoint.restore(
    manager, step, variables=target("variables"), opt_state=target("opt_state")
  )
  logging.info("Resumed from step %d", step)
  return {
    "variables": restored["variables"],
    "opt_state": restored["opt_state"],
    "step": jax.device_put(jnp.int32(step), shardings["step"]),
    "bad_step": jax.device_put(jnp.int32(-1), shardings["bad_step"]),
  }


def load_pretrained(init_from, initialized):
  """Variables of the latest checkpoint of workdir `init_from`, merged into `initialized` for
  fine-tuning (`convert.merge_pretrained`: a class head of another size stays `initialized`)."""
  pre_model = models.build_model(checkpoint.load_config(init_from).model)
  manager = checkpoint.create_manager(init_from, read_only=True)
  abstract = models.abstract_variables(pre_model)
  pretrained, step, _ = checkpoint.restore_newest(
    manager, lambda s: checkpoint.restore(manager, s, variables=abstract)["variables"]
  )
  manager.close()
  if step is None:
    raise checkpoint.CheckpointNotFound(f"config.init_from={init_from!r} holds no checkpoint")
  merged, reinit = convert.merge_pretrained(pretrained, initialized)
  logging.info("Initialized from %s step %d; re-initialized: %s", init_from, step, reinit)
  return merged
