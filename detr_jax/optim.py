"""AdamW with the reference DETR's parameter groups, gradient clipping and step schedule."""

import flax
import jax
import jax.numpy as jnp
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


def param_groups(params, backbone_trainable, train_only_mask_head):
  """Pytree of labels like `params`: "frozen", "backbone" (trainable backbone) or "transformer"
  (everything else that trains; `models.trainable_mask` says what trains)."""
  mask = flax.traverse_util.flatten_dict(
    models.trainable_mask(params, backbone_trainable, train_only_mask_head)
  )
  labels = {
    path: ("frozen" if not m else "backbone" if path[0] == "backbone" else "transformer")
    for path, m in mask.items()
  }
  return flax.traverse_util.unflatten_dict(labels)


def clip_by_global_norm(max_norm):
  """Gradient clipping as the reference's `torch.nn.utils.clip_grad_norm_`.

  Every gradient is multiplied by min(1, max_norm / (global_norm + 1e-6)), torch's formula
  (optax.clip_by_global_norm divides by the norm instead and has no 1e-6). One scalar
  multiply, which XLA fuses into both Adam moment updates; optax's select-and-divide form
  is not fused and costs an extra pass over the gradients (DETR-R50's clipped AdamW update
  on the 2-core CPU: 87 ms with optax's, 53 ms with this; docs/benchmarks.md).
  """

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def create_optimizer(
  params,
  *,
  learning_rate,
  backbone_lr_mult,
  weight_decay,
  grad_clip_norm,
  backbone_trainable,
  train_only_mask_head,
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
  parameter. With `train_only_mask_head` everything but the segmentation head is frozen
  (`models.trainable_mask`). Returns (optax transformation, schedule of the transformer
  learning rate).
  """
  schedule = learning_rate_schedule(
    learning_rate,
    steps_per_epoch=steps_per_epoch,
    lr_drop_epochs=lr_drop_epochs,
    lr_drop_factor=lr_drop_factor,
    warmup_steps=warmup_steps,
  )
  backbone_schedule = lambda step: backbone_lr_mult * schedule(step)
  labels = param_groups(params, backbone_trainable, train_only_mask_head)
  frozen = _label_mask(labels, "frozen")
  adamw = lambda lr: optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
  tx = optax.chain(
    optax.masked(optax.set_to_zero(), frozen),
    clip_by_global_norm(grad_clip_norm) if grad_clip_norm > 0 else optax.identity(),
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
  lr_drop_factor, warmup_steps, model.backbone_trainable, model.train_only_mask_head).
  Returns (tx, schedule)."""
  return create_optimizer(
    params,
    learning_rate=config.learning_rate,
    backbone_lr_mult=config.backbone_lr_mult,
    weight_decay=config.weight_decay,
    grad_clip_norm=config.grad_clip_norm,
    backbone_trainable=tuple(config.model.backbone_trainable),
    train_only_mask_head=config.model.train_only_mask_head,
    steps_per_epoch=steps_per_epoch,
    lr_drop_epochs=config.lr_drop_epochs,
    lr_drop_factor=config.lr_drop_factor,
    warmup_steps=config.warmup_steps,
  )


def _label_mask(labels, value):
  """Boolean pytree: True where the label equals `value`."""
  flat = flax.traverse_util.flatten_dict(labels)
  return flax.traverse_util.unflatten_dict({k: v == value for k, v in flat.items()})
