"""Checkpoints of a workdir: orbax `CheckpointManager` under `WORKDIR/checkpoints`, and the
run's config as `WORKDIR/config.json`.

Each step holds up to three items: `variables` (`{"params", "batch_stats"}`, what
`model.apply` takes), `opt_state` (absent in converted checkpoints) and `meta` (JSON: `step`
and the data position). Orbax writes a step into a temporary directory and renames it when
complete, so a crash mid-save never leaves a checkpoint that a restart would load.
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from detr_jax import config_utils, files, models, sharding

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def create_manager(workdir, *, max_to_keep=3, async_save=True, read_only=False):
  """A CheckpointManager for `workdir/checkpoints`."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    enable_async_checkpointing=async_save,
    create=not read_only,
    read_only=read_only,
  )
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  return ocp.CheckpointManager(
    directory, options=options, item_names=("variables", "opt_state", "meta")
  )


def save(manager, step, *, variables, meta, opt_state=None, force=False):
  """Saves one step (asynchronously when the manager is async). Returns whether it saved."""
  items = dict(variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager, step, *, variables, opt_state=None):
  """Restores `step` into the structure (and shardings) of the given abstract targets.

  Args:
    variables: pytree of `jax.ShapeDtypeStruct` (with `.sharding`) or arrays, like the
      model's variables. opt_state: the same for the optimizer state, or None to skip it.

  Returns:
    dict with `variables`, `meta` and (if asked for) `opt_state`.
  """
  items = dict(variables=ocp.args.StandardRestore(variables), meta=ocp.args.JsonRestore())
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(opt_state)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return {k: restored[k] for k in items}


def save_config(workdir, config):
  """Writes the run's config as JSON into the workdir."""
  os.makedirs(workdir, exist_ok=True)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  files.write_atomic(os.path.join(workdir, CONFIG_FILE), lambda f: f.write(text.encode()))


def load_config(workdir, overrides=()):
  """The ConfigDict saved by `save_config` (lists where the file had tuples), with
  `FIELD=VALUE` `overrides` applied (`config_utils.apply_overrides`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"No {CONFIG_FILE} in workdir {workdir!r}: was it trained or converted?"
    )
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  return config_utils.apply_overrides(config, overrides)


def write_variables(workdir, variables, config, step=0):
  """Writes a checkpoint with only model variables (e.g. imported weights) plus the config."""
  save_config(workdir, config)
  manager = create_manager(workdir, async_save=False)
  save(manager, step, variables=variables, meta={"step": step}, force=True)
  manager.wait_until_finished()
  manager.close()


def restore_model(workdir, config, step=None, mesh=None):
  """The model of `config` (the workdir's, `load_config`) and its variables at checkpoint
  `step` (default: the latest).

  Returns:
    (model, variables replicated over `mesh`, step).
  """
  mesh = mesh or sharding.create_mesh()
  model = models.build_model(config.model)
  abstract = models.abstract_variables(model)
  repl = sharding.replicated(mesh)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract)
  manager = create_manager(workdir, read_only=True)
  steps = manager.all_steps()
  step = manager.latest_step() if step is None else step
  if step is None or step not in steps:
    raise FileNotFoundError(
      f"No checkpoint {'' if step is None else step} in {workdir}; have {steps}"
    )
  variables = restore(manager, step, variables=abstract)["variables"]
  manager.close()
  return model, variables, step
