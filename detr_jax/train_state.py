"""The training state: what it holds, how it is sharded, and where a run's first one comes from.

A state is a dict:
  variables  {"params", "batch_stats"}, what `model.apply` takes;
  opt_state  the optimizer's state;
  step       int32 scalar, steps done;
  bad_step   int32 scalar, the first step whose loss was not finite, or -1.

`initial_state` gives a run its first state, already sharded over the mesh: restored from the
workdir's latest checkpoint (resume), or fresh: random, from a pretrained workdir
(`config.init_from`), or with frozen BatchNorm statistics estimated from the first batch
(`config.bn_init_from_data`).
"""

import jax
import jax.numpy as jnp
from absl import logging

from detr_jax import checkpoint, convert, models, sharding


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
    lambda r: models.init_variables(model, r, tuple(config.image_size)),
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
  step = manager.latest_step()
  if step is not None:
    return restore_state(manager, step, abstract, shardings), step
  variables = None
  if config.init_from:
    random = random_variables(model, config, shardings["variables"])
    variables = jax.device_put(load_pretrained(config.init_from, random), shardings["variables"])
  elif config.bn_init_from_data:
    random = random_variables(model, config, shardings["variables"])
    variables = jax.jit(
      lambda v, x: models.calibrate_batch_norm(model, v, x), out_shardings=shardings["variables"]
    )(random, first_images())
    logging.info("Frozen BatchNorm statistics estimated from the first training batch")
  return fresh_state(model, tx, config, shardings, variables), 0


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
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"config.init_from={init_from!r} holds no checkpoint")
  pretrained = checkpoint.restore(manager, step, variables=models.abstract_variables(pre_model))
  merged, reinit = convert.merge_pretrained(pretrained["variables"], initialized)
  logging.info("Initialized from %s step %d; re-initialized: %s", init_from, step, reinit)
  return merged
