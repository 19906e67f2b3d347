"""`train_and_evaluate(config, workdir)`: the training program behind train.py.

Sections in the order the program runs: config checks, mesh and data; model, optimizer,
state (`train_state.initial_state`: fresh, resumed or pretrained) and the jitted step
(`train_step`); the loop with logging, checkpoints, evaluation and preemption handling.
"""

import glob
import os
import signal

import jax
import ml_collections
import tensorflow as tf
from absl import logging
from clu import metric_writers

import input_pipeline
from configs import base
from detr_jax import (
  backbone,
  checkpoint,
  evaluation,
  postprocess,
  progress,
  runtime,
  sharding,
  train_state,
  train_step,
)


def _unknown_fields(config, reference, prefix=""):
  out = []
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      out.append(name)
    elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(
      reference[key], ml_collections.ConfigDict
    ):
      out += _unknown_fields(config[key], reference[key], name + ".")
  return out


def validate_config(config, num_devices, num_processes=1):
  """Fails with a clear message on unknown or inconsistent config fields."""
  unknown = _unknown_fields(config, base.get_config())
  if unknown:
    raise ValueError(f"Unknown config fields (not in configs/base.py): {', '.join(unknown)}")
  for name in ("batch_size", "eval_batch_size"):
    value = config[name]
    if value <= 0 or value % num_devices or value % num_processes:
      raise ValueError(
        f"config.{name}={value} must be a positive multiple of the device count "
        f"({num_devices}) and of the process count ({num_processes})"
      )
  stride = backbone.output_stride(config.model.dilation)
  h, w = config.image_size
  if h % stride or w % stride:
    raise ValueError(
      f"config.image_size={tuple(config.image_size)} must be divisible by the backbone "
      f"stride {stride}"
    )
  if config.bn_init_from_data and config.model.backbone_weights:
    raise ValueError(
      "config.bn_init_from_data=True re-estimates the BatchNorm statistics of a backbone "
      f"trained from scratch; config.model.backbone_weights={config.model.backbone_weights!r} "
      'loads ImageNet ones: set one of them off (backbone_weights="" for random)'
    )
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("Set config.num_train_steps > 0 or config.num_epochs > 0")


def schedule_lengths(config, num_train_examples):
  """(steps per epoch, total steps) of a config: `num_train_steps` wins when > 0."""
  steps_per_epoch = max(1, num_train_examples // config.batch_size)
  if config.num_train_steps > 0:
    return steps_per_epoch, config.num_train_steps
  return steps_per_epoch, config.num_epochs * steps_per_epoch


def train_and_evaluate(config, workdir):
  """Trains DETR per `config`, checkpointing and evaluating into `workdir`.

  Resumes automatically from the newest checkpoint in `workdir` that can be read (damaged
  newer ones are moved aside), including the data position; a workdir whose checkpoints hold
  another model stops the run before anything is written (`checkpoint.check_resume_config`).
  Logs through `progress.TrainLog` (console line, TensorBoard, `metrics.jsonl`). Returns the
  last logged training metrics and the last evaluation metrics.
  """
  # ---- Config, mesh, data --------------------------------------------------------------
  validate_config(config, jax.device_count(), jax.process_count())
  # A resume with another model stops here, before anything in the workdir changes.
  changes = checkpoint.check_resume_config(workdir, config)
  input_pipeline.ensure_prepared(  # before anything is built: a missing dataset says so first
    config.data,
    is_coordinator=jax.process_index() == 0,
    barrier=lambda: runtime.sync_processes("data_prepared", timeout=48 * 3600),
  )
  mesh = sharding.create_mesh()
  info = input_pipeline.get_dataset_info(config.data)
  if info.num_classes != config.model.num_classes:
    raise ValueError(
      f"config.model.num_classes={config.model.num_classes} but dataset "
      f"{config.data.name!r} has {info.num_classes} classes"
    )
  steps_per_epoch, total_steps = schedule_lengths(config, info.num_train_examples)
  image_size = tuple(config.image_size)

  def train_batches(start_step):
    return input_pipeline.create_train_iterator(
      config.data,
      image_size=image_size,
      global_batch_size=config.batch_size,
      seed=config.seed,
      start_step=start_step,
    )

  # ---- Model, optimizer, state, step ----------------------------------------------------
  model, tx, step_fn = train_step.from_config(config, mesh, steps_per_epoch)
  # Orbax's manager starts with a collective, the run's first: line the processes up first
  # (see runtime.compile_then_sync).
  runtime.sync_processes("checkpoint_manager")
  manager = checkpoint.create_manager(workdir, max_to_keep=config.keep_checkpoints)
  first_images = lambda: sharding.global_batch(next(train_batches(0)), mesh)["image"]
  state, start_step = train_state.initial_state(config, model, tx, mesh, manager, first_images)
  step_fn = train_step.jit_step(step_fn, state, mesh)
  predict_fn = postprocess.make_predict_fn(model)
  eval_batches = None  # built at the first evaluation, iterated again at every later one
  changes = changes if start_step > 0 else []
  for name, saved, given in changes:
    logging.info("Resuming at step %d with %s = %r (was %r)", start_step, name, given, saved)
  if jax.process_index() == 0:
    checkpoint.record_config(workdir, config, start_step, changes)
  writer = _metric_writer(workdir)
  saver = checkpoint.Writer(manager)

  # ---- Loop -----------------------------------------------------------------------------
  batches = train_batches(start_step)
  logging.info(
    "Training steps %d..%d (%d per epoch) on %d devices",
    start_step,
    total_steps,
    steps_per_epoch,
    jax.device_count(),
  )
  preempted = []
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  log = progress.TrainLog(
    writer,
    workdir,
    batch_size=config.batch_size,
    start_step=start_step,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
    eval_every_steps=config.eval_every_steps,
  )
  eval_metrics = {}
  failed = True
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = sharding.global_batch(next(batches), mesh)
      if step == start_step + 1:
        step_fn = runtime.compile_then_sync(step_fn, state, batch, name=f"train_step_{step}")
      state, metrics = step_fn(state, batch)
      log.add(metrics)
      if step % config.log_every_steps == 0 or step == total_steps:
        _check_finite(state, manager, workdir)
        log.write(step)
      stop = bool(preempted) or (jax.process_count() > 1 and manager.reached_preemption(step))
      if step % config.checkpoint_every_steps == 0 or step == total_steps or stop:
        _check_finite(state, manager, workdir)
        saver.save(
          step,
          variables=state["variables"],
          opt_state=state["opt_state"],
          meta={"step": step},
          force=stop,
        )
      if stop:
        logging.warning("Preempted: saved step %d, exiting.", step)
        break
      if config.eval_every_steps > 0 and (
        step % config.eval_every_steps == 0 or step == total_steps
      ):
        with log.evaluation(step) as scores:
          if eval_batches is None:
            eval_batches = evaluation.eval_batches(config)
          eval_metrics = evaluation.evaluate_and_write(
            predict_fn, state["variables"], config, info, mesh, workdir, step, writer, eval_batches
          )
          scores.update(eval_metrics)
    failed = False
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    writer.flush()
    try:
      saver.close()
    except Exception as e:
      if not failed:
        raise
      logging.warning("While closing the checkpoints after the error: %s", e)
  return {"train": log.last, "eval": eval_metrics, "step": int(jax.device_get(state["step"]))}


def _check_finite(state, manager, workdir):
  """Raises if a step since the start had a non-finite loss (`state["bad_step"]`)."""
  bad = int(jax.device_get(state["bad_step"]))
  if bad >= 0:
    raise FloatingPointError(
      f"Non-finite loss at step {bad + 1}; training stopped. The last good checkpoint "
      f"(step {manager.latest_step()}) in {workdir} is kept."
    )


def _metric_writer(workdir):
  """TensorBoard events in the workdir (process 0; the other processes write nothing). The
  console gets `progress.TrainLog`'s line instead of every scalar."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])


def read_scalars(workdir, tag="train/loss"):
  """{step: value} of a scalar that training wrote to the TensorBoard events in `workdir`.

  Reads every events file (a resumed run adds one); for a step written twice (a step redone
  after a kill) the later file wins. Tags are those of the logs: "train/loss", "eval/AP50", ...
  """
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = float(tf.make_ndarray(v.tensor))
  return out
