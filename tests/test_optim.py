"""The optimizer against the reference's: torch AdamW with DETR's parameter groups and
`torch.nn.utils.clip_grad_norm_`."""

import flax
import jax
import numpy as np
import optax
import pytest
import torch

from detr_jax import optim

SHAPES = {
  ("backbone", "conv1", "kernel"): (3, 3, 2, 4),  # stem: frozen
  ("backbone", "layer1_0", "conv1", "kernel"): (1, 1, 4, 4),  # frozen
  ("backbone", "layer2_0", "conv1", "kernel"): (3, 3, 4, 8),
  ("backbone", "layer2_0", "bn1", "scale"): (8,),
  ("transformer", "linear1", "kernel"): (8, 16),
  ("transformer", "linear1", "bias"): (16,),
  ("class_embed", "kernel"): (16, 5),
}
TRAINABLE = ("layer2", "layer3", "layer4")


def _tree(values):
  return flax.traverse_util.unflatten_dict(dict(zip(SHAPES, values)))


def _values(tree):
  """The leaves of `tree` in the order of SHAPES."""
  flat = flax.traverse_util.flatten_dict(tree)
  return [flat[path] for path in SHAPES]


def test_clip_matches_torch_clip_grad_norm():
  rng = np.random.default_rng(0)
  for max_norm, scale in [(0.1, 1.0), (0.1, 1e-3), (5.0, 1.0)]:  # clipped, not, not
    grads = [(rng.normal(size=s) * scale).astype(np.float32) for s in SHAPES.values()]
    tensors = [torch.zeros(s, requires_grad=True) for s in SHAPES.values()]
    for t, g in zip(tensors, grads):
      t.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    tx = optim.clip_by_global_norm(max_norm)
    ours, _ = tx.update(_tree(grads), tx.init(None))
    ours = _values(ours)
    for a, t in zip(ours, tensors):
      np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-6)
    norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    got = np.sqrt(sum(float((np.asarray(a, np.float64) ** 2).sum()) for a in ours))
    assert got == pytest.approx(min(norm, max_norm), rel=1e-5)


def test_adamw_groups_clip_and_lr_drop_match_torch():
  """Six steps of our optimizer and of torch's (AdamW, backbone lr x 0.1, weight decay,
  clip 0.1 over the trainable parameters, lr x 0.1 from step 4) give the same parameters;
  frozen stages keep theirs and get no optimizer state."""
  rng = np.random.default_rng(1)
  init = [rng.normal(size=s).astype(np.float32) for s in SHAPES.values()]
  lr, mult, wd, drop_at = 1e-2, 0.1, 1e-4, 4
  tx, _ = optim.create_optimizer(
    _tree(init),
    learning_rate=lr,
    backbone_lr_mult=mult,
    weight_decay=wd,
    grad_clip_norm=0.1,
    backbone_trainable=TRAINABLE,
    train_only_mask_head=False,
    steps_per_epoch=1,
    lr_drop_epochs=drop_at,
    lr_drop_factor=0.1,
  )
  params = jax.tree.map(jax.numpy.asarray, _tree(init))
  state = tx.init(params)
  trainable = [path[0] != "backbone" or path[1].startswith(TRAINABLE) for path in SHAPES]
  tensors = [torch.tensor(x, requires_grad=True) for x in init]
  backbone = [t for t, tr, p in zip(tensors, trainable, SHAPES) if tr and p[0] == "backbone"]
  rest = [t for t, tr, p in zip(tensors, trainable, SHAPES) if tr and p[0] != "backbone"]
  groups = [{"params": backbone, "lr": lr * mult}, {"params": rest, "lr": lr}]
  torch_opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for step in range(6):
    # Large gradients on odd steps (clipped), small on even ones (not clipped).
    grads = [
      (rng.normal(size=s) * (1.0 if step % 2 else 1e-3)).astype(np.float32) for s in SHAPES.values()
    ]
    if step == drop_at:
      for group in torch_opt.param_groups:
        group["lr"] *= 0.1
    for t, g, tr in zip(tensors, grads, trainable):
      t.grad = torch.from_numpy(g.copy()) if tr else None
    torch.nn.utils.clip_grad_norm_([t for t, tr in zip(tensors, trainable) if tr], 0.1)
    torch_opt.step()
    updates, state = update(_tree(grads), state, params)
    params = optax.apply_updates(params, updates)
  ours = _values(params)
  for path, a, t, x0, tr in zip(SHAPES, ours, tensors, init, trainable):
    np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=str(path))
    assert np.array_equal(np.asarray(a), x0) != tr, path  # frozen: unchanged; trainable: moved
  moments = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0]
  assert sum(x.size for x in moments) == 2 * sum(
    np.prod(s) for s, tr in zip(SHAPES.values(), trainable) if tr
  )
