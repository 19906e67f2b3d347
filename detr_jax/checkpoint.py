"""Checkpoints of a workdir: orbax `CheckpointManager` under `WORKDIR/checkpoints`, and the
run's config as `WORKDIR/config.json` with the history of its segments.

Each step holds up to three items: `variables` (`{"params", "batch_stats"}`, what
`model.apply` takes), `opt_state` (absent in converted checkpoints) and `meta` (JSON: `step`
and the data position). Orbax writes a step into a temporary directory and renames it when
complete, so a crash mid-save never leaves a checkpoint that a restart would load.

A workdir's `config.json` is always the config of its checkpoints: a run that resumes with
other values of a field that fixes what a checkpoint holds (`fixed_field`) stops before it
touches anything (`check_resume_config`). Every start of a run (a segment) appends its config,
its first step and what changed to `config_history.jsonl` (`record_config`).

A checkpoint that cannot be read (missing or truncated files, bad metadata) raises
`DamagedCheckpoint` from `restore`; `restore_newest` falls back to the newest intact step, and
training moves the damaged ones to `WORKDIR/checkpoints_damaged/STEP` (`move_aside`). A save
that fails (a full disk) raises a `runtime.UserError` that names the step and its path
(`Writer`).
"""

import datetime
import errno
import json
import os
import re

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from detr_jax import config_utils, files, models, runtime, sharding

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"

# model.* fields a resumed run may change: kernel and precision choices, the dropout rate and
# the initial backbone weights (read by a fresh run only) change no saved array. Every other
# model.* field (architecture, class count, the trainable backbone parts that shape the
# optimizer state) fixes what a checkpoint holds. The other sections (loss, data, schedule,
# intervals, paths) change no saved array either and may change on resume.
RESUMABLE_MODEL_FIELDS = frozenset(
  {"dtype", "remat", "attention", "conv", "dropout", "backbone_weights"}
)


class CheckpointNotFound(runtime.UserError, FileNotFoundError):
  """A workdir without the config or checkpoint asked for."""


class DamagedCheckpoint(Exception):
  """A checkpoint step that cannot be read: `step`, `path` (its directory) and `reason`."""

  def __init__(self, step, path, reason):
    super().__init__(f"Checkpoint step {step} ({path}) cannot be read: {reason}")
    self.step, self.path, self.reason = step, path, reason


def create_manager(workdir, *, max_to_keep=3, async_save=True, read_only=False):
  """A CheckpointManager for `workdir/checkpoints`.

  A writable one removes the temporary directories of saves that never completed (a kill or a
  full disk mid-save) when it starts.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    enable_async_checkpointing=async_save,
    create=not read_only,
    read_only=read_only,
    cleanup_tmp_directories=not read_only,
  )
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  return ocp.CheckpointManager(
    directory, options=options, item_names=("variables", "opt_state", "meta")
  )


def step_path(manager, step):
  """The directory of checkpoint `step`."""
  return os.path.join(str(manager.directory), str(step))


def save(manager, step, *, variables, meta, opt_state=None, force=False):
  """Saves one step (asynchronously when the manager is async). Returns whether it saved."""
  items = dict(variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


# ---- Reading, and what a damaged checkpoint looks like -----------------------------------

# What orbax, tensorstore and json raise on missing, truncated or corrupt files (tensorstore's
# errors are ValueErrors; json.JSONDecodeError is one too).
_READ_ERRORS = (ValueError, OSError, KeyError, TypeError)


def _reason(error):
  """One line for the log: the exception's type and the first line of its message."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return f"{type(error).__name__}: {text[:300]}"


def _path_name(path):
  """A pytree key path as dotted names, the way orbax names saved arrays."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return ".".join(parts)


def _shapes(tree):
  """{dotted path: shape} of a pytree's arrays (or orbax array metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(p): tuple(leaf.shape) for p, leaf in leaves if hasattr(leaf, "shape")}


def structure_differences(saved, given, limit=8):
  """Lines that say how two {path: shape} maps differ (at most `limit`, then a count)."""
  lines = [f"{k}: saved {v} vs given {given[k]}" for k, v in saved.items() if given.get(k, v) != v]
  lines += [f"{k}: saved {v}, not in the given model" for k, v in saved.items() if k not in given]
  lines += [f"{k}: given {v}, not in the checkpoint" for k, v in given.items() if k not in saved]
  if len(lines) > limit:
    lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
  return lines


def _check_item(manager, step, name, target):
  """Reads item `name`'s array metadata: DamagedCheckpoint if unreadable, UserError if its
  arrays differ from `target`'s (a model or optimizer other than the checkpoint's)."""
  directory = epath.Path(step_path(manager, step)) / name
  if not directory.exists():
    reason = f"no {name} item"
    if name == "opt_state":
      reason += " (a converted model? start a new workdir from it with config.init_from)"
    raise DamagedCheckpoint(step, step_path(manager, step), reason)
  try:
    saved = _shapes(ocp.StandardCheckpointHandler().metadata(directory).tree)
  except PermissionError as e:
    raise runtime.UserError(f"Checkpoint step {step}: {e}") from None
  except _READ_ERRORS as e:
    raise DamagedCheckpoint(step, step_path(manager, step), f"{name}: {_reason(e)}") from None
  differences = structure_differences(saved, _shapes(target))
  if differences:
    raise runtime.UserError(
      f"Checkpoint step {step} in {manager.directory} holds another {name} structure than "
      "this config's (saved vs given):\n  " + "\n  ".join(differences)
    )


def restore(manager, step, *, variables, opt_state=None):
  """Restores `step` into the structure (and shardings) of the given abstract targets.

  Args:
    variables: pytree of `jax.ShapeDtypeStruct` (with `.sharding`) or arrays, like the
      model's variables. opt_state: the same for the optimizer state, or None to skip it.

  Returns:
    dict with `variables`, `meta` and (if asked for) `opt_state`.

  Raises:
    DamagedCheckpoint: missing or truncated files, unreadable metadata.
    runtime.UserError: the checkpoint's arrays are not those of the targets.
  """
  targets = {"variables": variables}
  if opt_state is not None:
    targets["opt_state"] = opt_state
  for name, target in targets.items():
    _check_item(manager, step, name, target)
  items = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
  items["meta"] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except PermissionError as e:
    raise runtime.UserError(f"Checkpoint step {step}: {e}") from None
  except _READ_ERRORS as e:
    raise DamagedCheckpoint(step, step_path(manager, step), _reason(e)) from None
  return {k: restored[k] for k in items}


def restore_newest(manager, restore_step):
  """`restore_step(step)` of the newest checkpoint that can be read.

  Tries the steps from the newest down; each `DamagedCheckpoint` is logged with its reason
  and skipped. In a multi-process run a step counts as intact only if every process read it.

  Returns:
    (result, step, list of the newer `DamagedCheckpoint`s), or (None, None, []) when the
    manager has no checkpoint.

  Raises:
    runtime.UserError: there are checkpoints and none can be read (nothing is moved).
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      result, error = restore_step(step), None
    except DamagedCheckpoint as e:
      result, error = None, e
    if not runtime.all_processes_agree(error is None) and error is None:
      error = DamagedCheckpoint(step, step_path(manager, step), "unreadable on another process")
    if error is None:
      return result, step, damaged
    logging.warning("%s", error)
    damaged.append(error)
  if damaged:
    raise runtime.UserError(
      f"No checkpoint in {manager.directory} can be read:\n  "
      + "\n  ".join(str(e) for e in damaged)
      + "\nMove the directory aside to start afresh, or use a new workdir."
    )
  return None, None, []


def move_aside(manager, damaged):
  """Moves damaged checkpoints (`DamagedCheckpoint`s) to `WORKDIR/checkpoints_damaged/STEP`
  (process 0; `.1`, `.2`, ... if taken), with the reason in `REASON.txt`; then reloads the
  manager's step list. Nothing is deleted."""
  if jax.process_index() == 0:
    root = os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIR)
    os.makedirs(root, exist_ok=True)
    for error in damaged:
      target, n = os.path.join(root, str(error.step)), 0
      while os.path.exists(target):
        n += 1
        target = os.path.join(root, f"{error.step}.{n}")
      os.rename(error.path, target)
      try:
        with open(os.path.join(target, "REASON.txt"), "w") as f:
          f.write(f"{error}\n")
      except OSError:  # a full disk: the log has the reason
        pass
      logging.warning("Moved the unreadable checkpoint step %d to %s", error.step, target)
  runtime.sync_processes(f"moved_damaged_{'_'.join(str(e.step) for e in damaged)}")
  manager.reload()


# ---- Writing ----------------------------------------------------------------------------

_DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'")


def is_disk_full(error):
  """Whether `error` says the disk (or the quota) is full: an OSError with ENOSPC / EDQUOT,
  or tensorstore's RESOURCE_EXHAUSTED message that orbax raises as a ValueError."""
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  return bool(_DISK_FULL.search(str(error)))


class Writer:
  """A training run's checkpoint saves (async), whose failures name the step and its path.

  Orbax reports an async save's failure at the next save or wait; the writer waits for the
  previous save before starting the next, so an error is attributed to the step that failed.
  A full disk becomes a `runtime.UserError` (what happened, which step, where, which earlier
  checkpoints are intact); other failures get the step and path as a note.
  """

  def __init__(self, manager):
    self.manager = manager
    self._in_flight = None

  def save(self, step, *, variables, opt_state, meta, force):
    """`save` of one step, after the previous one has finished."""
    self.wait()
    self._in_flight = step
    try:
      save(self.manager, step, variables=variables, opt_state=opt_state, meta=meta, force=force)
    except Exception as e:
      raise self._error(e) from None

  def wait(self):
    """Waits for the save in flight; raises its error."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._error(e) from None
    self._in_flight = None

  def close(self):
    """Waits for the save in flight and closes the manager."""
    try:
      self.wait()
    finally:
      self._in_flight = None
      self.manager.close()

  def _error(self, error):
    step = self._in_flight
    self._in_flight = None
    path = step_path(self.manager, step)
    # From the disk: orbax's own list already dropped the steps this save was to replace.
    intact = [s for s in steps_on_disk(str(self.manager.directory)) if s != step]
    if is_disk_full(error):
      return runtime.UserError(
        f"Out of disk space while saving checkpoint step {step} to {path} "
        f"({_reason(error)}). The earlier checkpoints (steps {intact or 'none'}) are intact; "
        "free space (or lower config.keep_checkpoints) and rerun the same command to resume "
        f"from step {max(intact) if intact else 0}."
      )
    error.add_note(f"while saving checkpoint step {step} to {path}")
    return error


# ---- The workdir's config ------------------------------------------------------------------


def _flat(tree, prefix=""):
  """{dotted field: value} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _as_json(config):
  """A ConfigDict as the plain JSON values config.json holds (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def fixed_field(name):
  """Whether config field `name` ("model.hidden_dim") fixes what a checkpoint holds."""
  section, _, field = name.partition(".")
  return section == "model" and field not in RESUMABLE_MODEL_FIELDS


def steps_on_disk(directory):
  """The completed steps in a checkpoint directory, listed without orbax (sorted)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def has_checkpoints(workdir):
  """Whether `WORKDIR/checkpoints` holds a step directory."""
  return bool(steps_on_disk(os.path.join(workdir, CHECKPOINT_DIR)))


def check_resume_config(workdir, config):
  """Compares `config` with the config of the workdir's checkpoints, before anything runs.

  Returns:
    [(field, saved value, given value)] of the fields that differ and may (the segment's
    changes); [] for a workdir without checkpoints or config.

  Raises:
    runtime.UserError: a field that fixes what a checkpoint holds differs (all listed).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not has_checkpoints(workdir) or not os.path.exists(path):
    return []
  with open(path) as f:
    saved = _flat(json.load(f))
  given = _flat(_as_json(config))
  changes = [(k, saved.get(k, "(absent)"), v) for k, v in given.items() if saved.get(k) != v]
  fixed = [(k, s, g) for k, s, g in changes if fixed_field(k) and k in saved]
  if fixed:
    lines = "\n  ".join(f"{k}: {s!r} (saved) vs {g!r} (given)" for k, s, g in fixed)
    raise runtime.UserError(
      f"{workdir} holds checkpoints of another model. These fields differ from its "
      f"{CONFIG_FILE} and fix what a checkpoint holds:\n  {lines}\n"
      "Nothing was changed. Resume with the saved values, or train this config in a new "
      f"--workdir (to start from these weights: --config.init_from={workdir})."
    )
  return changes


def record_config(workdir, config, start_step, changes):
  """Writes `config` as the workdir's `config.json` and appends a segment to
  `config_history.jsonl`: {"start_step", "time", "changes": {field: [saved, given]},
  "config"}. The segment that trained step k is the last line with start_step < k."""
  os.makedirs(workdir, exist_ok=True)
  save_config(workdir, config)
  line = {
    "start_step": int(start_step),
    "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "changes": {k: [s, g] for k, s, g in changes},
    "config": _as_json(config),
  }
  files.append_line(os.path.join(workdir, CONFIG_HISTORY_FILE), json.dumps(line, sort_keys=True))


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
    raise CheckpointNotFound(
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
  `step` (default: the newest that can be read; a damaged newer one is skipped and logged).

  Returns:
    (model, variables replicated over `mesh`, step).

  Raises:
    CheckpointNotFound: no such step. runtime.UserError: `step` is damaged, or none can be read.
  """
  mesh = mesh or sharding.create_mesh()
  model = models.build_model(config.model)
  abstract = models.abstract_variables(model)
  repl = sharding.replicated(mesh)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract)
  manager = create_manager(workdir, read_only=True)
  steps = manager.all_steps()
  read = lambda s: restore(manager, s, variables=abstract)["variables"]
  try:
    if step is None:
      variables, step, damaged = restore_newest(manager, read)
      if step is None:
        raise CheckpointNotFound(f"No checkpoint in {workdir}")
      if damaged:
        logging.warning(
          "Using checkpoint step %d, the newest that can be read (step %s cannot be read)",
          step,
          ", ".join(str(e.step) for e in damaged),
        )
    elif step not in steps:
      raise CheckpointNotFound(f"No checkpoint {step} in {workdir}; have {steps}")
    else:
      try:
        variables = read(step)
      except DamagedCheckpoint as e:
        raise runtime.UserError(str(e)) from None
  finally:
    manager.close()
  return model, variables, step
