"""`train_and_evaluate(config, workdir)`: the training program behind train.py.

Sections in the order the program runs: config checks, mesh, input, model and optimizer,
sharded state (fresh, resumed or from pretrained weights), the jitted step, the loop with
logging, checkpoints, evaluation and preemption handling.
"""

import glob
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from clu import metric_writers, periodic_actions
from orbax.checkpoint import multihost as ocp_multihost

import input_pipeline
from configs import base
from detr_jax import backbone, checkpoint, conv, convert, evaluation, models, optim, sharding
from detr_jax import loss as loss_lib


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
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("Set config.num_train_steps > 0 or config.num_epochs > 0")


def _with_sharding(abstract, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def _load_pretrained(init_from, initialized):
  """Variables of the latest checkpoint in workdir `init_from`, merged for fine-tuning."""
  pre_config = checkpoint.load_config(init_from)
  pre_model = models.build_model(pre_config.model)
  stride = backbone.output_stride(pre_config.model.dilation)
  abstract = jax.eval_shape(
    lambda: models.init_variables(pre_model, jax.random.key(0), (2 * stride, 2 * stride))
  )
  manager = checkpoint.create_manager(init_from, read_only=True)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"config.init_from={init_from!r} holds no checkpoint")
  pretrained = checkpoint.restore(manager, step, variables=abstract)["variables"]
  merged, reinit = convert.merge_pretrained(pretrained, initialized)
  logging.info("Initialized from %s step %d; re-initialized: %s", init_from, step, reinit)
  return merged


def train_and_evaluate(config, workdir):
  """Trains DETR per `config`, checkpointing and evaluating into `workdir`.

  Resumes automatically from the latest checkpoint in `workdir`, including the data
  position. Returns the last logged training metrics and the last evaluation metrics.
  """
  # ---- Config, mesh, input ------------------------------------------------------------
  validate_config(config, jax.device_count(), jax.process_count())
  mesh = sharding.create_mesh()
  info = input_pipeline.get_dataset_info(config.data)
  if info.num_classes != config.model.num_classes:
    raise ValueError(
      f"config.model.num_classes={config.model.num_classes} but dataset "
      f"{config.data.name!r} has {info.num_classes} classes"
    )
  steps_per_epoch = max(1, info.num_train_examples // config.batch_size)
  total_steps = (
    config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
  )
  if jax.process_index() == 0:
    checkpoint.save_config(workdir, config)
  writer = metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() != 0, asynchronous=True
  )

  # ---- Model and optimizer ------------------------------------------------------------
  model = models.build_model(config.model)
  image_size = tuple(config.image_size)
  init_rng = jax.random.key(config.seed)
  abstract_vars = jax.eval_shape(lambda: models.init_variables(model, init_rng, image_size))
  tx, schedule = optim.create_optimizer_from_config(
    abstract_vars["params"], config, steps_per_epoch
  )
  trainable = models.trainable_mask(abstract_vars["params"], config.model.backbone_trainable)
  loss_fn = loss_lib.make_loss_fn(config.loss, config.model.num_classes, mesh=mesh)

  # ---- Sharded state: fresh, resumed, or from pretrained weights ------------------------
  abstract_opt = jax.eval_shape(tx.init, abstract_vars["params"])
  var_shardings = sharding.param_sharding(abstract_vars, mesh, fsdp=config.fsdp)
  opt_shardings = sharding.param_sharding(abstract_opt, mesh, fsdp=config.fsdp)
  repl = sharding.replicated(mesh)

  def init_state(variables):
    return {
      "variables": variables,
      "opt_state": tx.init(variables["params"]),
      "step": jnp.zeros((), jnp.int32),
      "bad_step": jnp.full((), -1, jnp.int32),
    }

  state_shardings = {
    "variables": var_shardings,
    "opt_state": opt_shardings,
    "step": repl,
    "bad_step": repl,
  }
  manager = checkpoint.create_manager(workdir, max_to_keep=config.keep_checkpoints)
  start_step = manager.latest_step()
  if start_step is not None:
    restored = checkpoint.restore(
      manager,
      start_step,
      variables=_with_sharding(abstract_vars, var_shardings),
      opt_state=_with_sharding(abstract_opt, opt_shardings),
    )
    state = {
      "variables": restored["variables"],
      "opt_state": restored["opt_state"],
      "step": jax.device_put(jnp.int32(start_step), repl),
      "bad_step": jax.device_put(jnp.int32(-1), repl),
    }
    logging.info("Resumed from step %d", start_step)
  else:
    start_step = 0
    variables = jax.jit(
      lambda r: models.init_variables(model, r, image_size), out_shardings=var_shardings
    )(init_rng)
    if config.init_from:
      variables = jax.device_put(_load_pretrained(config.init_from, variables), var_shardings)
    elif config.bn_init_from_data:
      first = input_pipeline.create_train_iterator(
        config.data,
        image_size=image_size,
        global_batch_size=config.batch_size,
        seed=config.seed,
        start_step=0,
      )
      images = sharding.global_batch(next(first), mesh)["image"]
      variables = jax.jit(
        lambda v, x: models.calibrate_batch_norm(model, v, x), out_shardings=var_shardings
      )(variables, images)
      logging.info("Frozen BatchNorm statistics estimated from the first training batch")
    state = jax.jit(init_state, out_shardings=state_shardings)(variables)

  # ---- The step ------------------------------------------------------------------------
  dropout_root = jax.random.fold_in(jax.random.key(config.seed), 1)

  def train_step(state, batch):
    variables = state["variables"]
    rng = jax.random.fold_in(dropout_root, state["step"])

    def loss_of(params):
      out = model.apply(
        {**variables, "params": params}, batch["image"], train=True, rngs={"dropout": rng}
      )
      return loss_fn(out, batch)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    step = state["step"]
    metrics["grad_norm"] = optax.tree.norm(
      jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, trainable)
    )
    metrics["learning_rate"] = schedule(step)
    metrics["learning_rate_backbone"] = config.backbone_lr_mult * schedule(step)
    bad = jnp.where((state["bad_step"] < 0) & ~jnp.isfinite(loss), step, state["bad_step"])
    new_state = {
      "variables": {**variables, "params": params},
      "opt_state": opt_state,
      "step": step + 1,
      "bad_step": bad,
    }
    return new_state, metrics

  train_step = jax.jit(
    train_step,
    donate_argnums=0,
    out_shardings=(state_shardings, repl),
    compiler_options=conv.compiler_options(),
  )
  predict_fn = evaluation.make_predict_fn(model)

  # ---- Helpers of the loop ---------------------------------------------------------------
  def check_finite(state):
    bad = int(jax.device_get(state["bad_step"]))
    if bad >= 0:
      raise FloatingPointError(
        f"Non-finite loss at step {bad + 1}; training stopped. The last good checkpoint "
        f"(step {manager.latest_step()}) in {workdir} is kept."
      )

  def save(state, step, force=False):
    check_finite(state)
    checkpoint.save(
      manager,
      step,
      variables=state["variables"],
      opt_state=state["opt_state"],
      meta={"step": step},
      force=force,
    )

  eval_metrics = {}

  def run_eval(state, step):
    nonlocal eval_metrics
    with report.timed("eval"):
      metrics, results, drawings, table = evaluation.evaluate(
        predict_fn,
        state["variables"],
        config,
        info,
        mesh,
        num_images_to_draw=config.num_eval_images_to_draw,
      )
    logging.info("Eval at step %d:\n%s", step, table)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    if drawings:
      writer.write_images(step, {"eval/detections": np.stack(drawings)})
    evaluation.write_results(workdir, step, metrics, results)
    eval_metrics = metrics

  preempted = []
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

  # ---- Training loop ---------------------------------------------------------------------
  train_iter = input_pipeline.create_train_iterator(
    config.data,
    image_size=image_size,
    global_batch_size=config.batch_size,
    seed=config.seed,
    start_step=start_step,
  )
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  logging.info(
    "Training steps %d..%d (%d per epoch) on %d devices",
    start_step,
    total_steps,
    steps_per_epoch,
    jax.device_count(),
  )
  pending, train_metrics = [], {}
  last_log = (time.time(), start_step)
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = sharding.global_batch(next(train_iter), mesh)
      if step == start_step + 1 and jax.process_count() > 1:
        train_step = _compile_then_sync(train_step, state, batch, step)
      state, metrics = train_step(state, batch)
      pending.append(metrics)
      report(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        check_finite(state)
        host = jax.device_get(pending)
        train_metrics = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        now = time.time()
        train_metrics["images_per_sec"] = (
          (step - last_log[1]) * config.batch_size / max(now - last_log[0], 1e-9)
        )
        last_log = (now, step)
        writer.write_scalars(step, {f"train/{k}": v for k, v in train_metrics.items()})
        pending = []
      stop = bool(preempted) or (jax.process_count() > 1 and manager.reached_preemption(step))
      if step % config.checkpoint_every_steps == 0 or step == total_steps or stop:
        save(state, step, force=stop)
      if stop:
        logging.warning("Preempted: saved step %d, exiting.", step)
        break
      if config.eval_every_steps > 0 and (
        step % config.eval_every_steps == 0 or step == total_steps
      ):
        run_eval(state, step)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    signal.signal(signal.SIGTERM, previous_handler)
  return {"train": train_metrics, "eval": eval_metrics, "step": int(jax.device_get(state["step"]))}


def _compile_then_sync(step_fn, state, batch, step):
  """`step_fn` compiled for these arguments, returned once every process has compiled it.

  The first collective of a CPU multi-process run sets up gloo, which waits only 30 s for
  the other processes; on a busy 2-core host one process can reach it more than 30 s after
  another (compiling, building its input pipeline) and the run dies. A coordination-service
  barrier with a long timeout, after compiling, lines the processes up first.
  """
  compiled = step_fn.lower(state, batch).compile()
  ocp_multihost.sync_global_processes(f"detr_jax_compiled_step_{step}", timeout=3600)
  return compiled


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
