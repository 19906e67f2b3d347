"""The training step: forward, set loss, backward, clipped AdamW update, logged metrics.

One step serves the trainer and the benchmarks (`benchmarks/train_step.py`,
`benchmarks/bf16_curve.py`), so the speed we publish is the speed we train at:

  model, tx, step_fn = train_step.from_config(config, mesh, steps_per_epoch)
  state = train_state.fresh_state(model, tx, config, shardings)  # or initial_state
  step = train_step.jit_step(step_fn, state, mesh)
  state, metrics = step(state, batch)

`state` is the dict of `detr_jax/train_state.py`; `batch` holds `image [B, H, W, 3]`,
`labels [B, T]`, `boxes [B, T, 4]` and `valid [B, T]` (the input pipeline's training batch).
"""

import jax
import jax.numpy as jnp
import optax

from detr_jax import loss as loss_lib
from detr_jax import models, optim, runtime, sharding


def make_train_step(model, loss_fn, tx, schedule, *, trainable, backbone_lr_mult, seed):
  """The pure step function `(state, batch) -> (new state, metrics)`.

  Args:
    model: the DETR module; loss_fn: `(outputs, batch) -> (loss, metrics)` (`loss.make_loss_fn`).
    tx, schedule: the optimizer and its learning-rate schedule (`optim.create_optimizer`).
    trainable: pytree of bools like the params (`models.trainable_mask`); the gradient norm
      is logged over these.
    backbone_lr_mult: logged backbone learning rate = schedule x this.
    seed: dropout masks are drawn from `fold_in(fold_in(key(seed), 1), step)`, so a resumed
      run draws the same masks as an uninterrupted one.

  Returns:
    `train_step(state, batch)`. Metrics: every term of `loss_fn`, `grad_norm` (trainable
    parameters, before clipping), `learning_rate`, `learning_rate_backbone`. A non-finite loss
    does not stop the step: the first such step is recorded in `state["bad_step"]`.
  """
  dropout_root = jax.random.fold_in(jax.random.key(seed), 1)

  def train_step(state, batch):
    variables = state["variables"]
    step = state["step"]
    rng = jax.random.fold_in(dropout_root, step)

    def loss_of(params):
      out = model.apply(
        {**variables, "params": params}, batch["image"], train=True, rngs={"dropout": rng}
      )
      return loss_fn(out, batch)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(
      jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, trainable)
    )
    metrics["learning_rate"] = schedule(step)
    metrics["learning_rate_backbone"] = backbone_lr_mult * schedule(step)
    bad = jnp.where((state["bad_step"] < 0) & ~jnp.isfinite(loss), step, state["bad_step"])
    new_state = {
      "variables": {**variables, "params": params},
      "opt_state": opt_state,
      "step": step + 1,
      "bad_step": bad,
    }
    return new_state, metrics

  return train_step


def from_config(config, mesh, steps_per_epoch):
  """(model, optimizer, step function) built from a full config: the one way to get the step.

  Args:
    config: a full config (configs/base.py fields). mesh: the device mesh (the matcher runs
      shard-local over its "data" axis). steps_per_epoch: for the epoch-based lr schedule.
  """
  model = models.build_model(config.model)
  params = models.abstract_variables(model)["params"]
  tx, schedule = optim.create_optimizer_from_config(params, config, steps_per_epoch)
  loss_fn = loss_lib.make_loss_fn(config.loss, model, mesh=mesh)
  step_fn = make_train_step(
    model,
    loss_fn,
    tx,
    schedule,
    trainable=models.trainable_mask(
      params, config.model.backbone_trainable, config.model.train_only_mask_head
    ),
    backbone_lr_mult=config.backbone_lr_mult,
    seed=config.seed,
  )
  return model, tx, step_fn


def jit_step(step_fn, state, mesh):
  """`step_fn` jitted with the state donated and the new state sharded like `state` (a state
  already placed on the mesh); metrics come back replicated."""
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  return jax.jit(
    step_fn,
    donate_argnums=0,
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    compiler_options=runtime.compiler_options(),
  )
