"""AdamW with the reference DETR's parameter groups, gradient clipping and step schedule."""

import flax
import optax

from detr_jax import models


def learning_rate_schedule(
  base_lr, *, steps_per_epoch, lr_drop_epochs, lr_drop_factor, warmup_steps=0
):
  """Constant `base_lr` (after an optional linear warmup), x `lr_drop_factor` at the drop epoch."""
  drop = optax.piecewise_constant_schedule(
    base_lr, {int(lr_drop_epochs * steps_per_epoch): lr_drop_factor}
  )
  if warmup_steps <= 0:
    return drop
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return optax.join_schedules([warmup, lambda s: drop(s + warmup_steps)], [warmup_steps])


def param_groups(params, backbone_trainable):
  """Pytree of labels like `params`: "frozen", "backbone" (trainable backbone) or "transformer"."""
  mask = flax.traverse_util.flatten_dict(models.trainable_mask(params, backbone_trainable))
  labels = {
    path: ("frozen" if not m else "backbone" if path[0] == "backbone" else "transformer")
    for path, m in mask.items()
  }
  return flax.traverse_util.unflatten_dict(labels)


def create_optimizer(
  params,
  *,
  learning_rate,
  backbone_lr_mult,
  weight_decay,
  grad_clip_norm,
  backbone_trainable,
  steps_per_epoch,
  lr_drop_epochs,
  lr_drop_factor,
  warmup_steps=0,
):
  """AdamW over the trainable parameters, as the reference trains DETR.

  Frozen parameters get no update and no optimizer state; gradients are clipped to a global
  norm of `grad_clip_norm` computed over the trainable parameters only (torch's
  clip_grad_norm_ sees no gradient for frozen ones); the backbone's learning rate is
  `backbone_lr_mult` times the transformer's; weight decay applies to every trainable
  parameter. Returns (optax transformation, schedule of the transformer learning rate).
  """
  schedule = learning_rate_schedule(
    learning_rate,
    steps_per_epoch=steps_per_epoch,
    lr_drop_epochs=lr_drop_epochs,
    lr_drop_factor=lr_drop_factor,
    warmup_steps=warmup_steps,
  )
  backbone_schedule = lambda step: backbone_lr_mult * schedule(step)
  labels = param_groups(params, backbone_trainable)
  frozen = _label_mask(labels, "frozen")
  adamw = lambda lr: optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
  tx = optax.chain(
    optax.masked(optax.set_to_zero(), frozen),
    optax.clip_by_global_norm(grad_clip_norm) if grad_clip_norm > 0 else optax.identity(),
    optax.multi_transform(
      {
        "frozen": optax.set_to_zero(),
        "backbone": adamw(backbone_schedule),
        "transformer": adamw(schedule),
      },
      labels,
    ),
  )
  return tx, schedule


def create_optimizer_from_config(params, config, steps_per_epoch):
  """`create_optimizer` with the top-level optimizer fields of an experiment config
  (learning_rate, backbone_lr_mult, weight_decay, grad_clip_norm, lr_drop_epochs,
  lr_drop_factor, warmup_steps, model.backbone_trainable). Returns (tx, schedule)."""
  return create_optimizer(
    params,
    learning_rate=config.learning_rate,
    backbone_lr_mult=config.backbone_lr_mult,
    weight_decay=config.weight_decay,
    grad_clip_norm=config.grad_clip_norm,
    backbone_trainable=tuple(config.model.backbone_trainable),
    steps_per_epoch=steps_per_epoch,
    lr_drop_epochs=config.lr_drop_epochs,
    lr_drop_factor=config.lr_drop_factor,
    warmup_steps=config.warmup_steps,
  )


def _label_mask(labels, value):
  """Boolean pytree: True where the label equals `value`."""
  flat = flax.traverse_util.flatten_dict(labels)
  return flax.traverse_util.unflatten_dict({k: v == value for k, v in flat.items()})
