"""Times DETR's full training step, ours (JAX) and optionally the transformers PyTorch DETR.

Ours: the trainer's own step (`detr_jax/train_step.py`): forward, Hungarian matching of all
decoder layers, set loss, backward, clipped AdamW update, gradient norm and the non-finite
guard -- one jitted, donated step. Two FLOP counts, both from XLA's cost analysis: the
"model" FLOPs of the step with direct convolutions (`model.conv="xla"`, the arithmetic the
reference does), and the "executed" FLOPs of the step as compiled (on CPU the Winograd kernel
gradients of detr_jax/conv.py do fewer multiplications). The machine's matmul peak is a large
jitted jnp.dot, measured in every round.

Reference (--torch): transformers' DetrForObjectDetection (random init, nothing downloaded,
transformers-native ResNet-50, FrozenBatchNorm) with its reference loss (scipy Hungarian
matching, auxiliary losses), AdamW and gradient clip 0.1, set up to train what the reference
DETR trains: transformers' own freezing rule matches no parameter name of its native ResNet
("stage.1" vs "stages.1") and would freeze the whole backbone, so layer2..layer4 are
unfrozen here (41,302,368 trainable parameters, as the reference and ours); and dropout 0.1
also on attention weights and after the FFN activation, as the reference's
nn.MultiheadAttention and FFN (transformers defaults those two to 0).

The implementations alternate step by step (`--rounds` rounds of one step each, after
`--warmup` untimed alternating rounds in which the heaps of both grow to their working size,
with a 1 s pause before each step so that neither starts while the other's OpenMP or Eigen
threads still spin), so a machine whose speed drifts (shared hosts) affects both alike; the
ratio is the median of the per-round ratios. Utilization is printed twice: median step time
against the median peak, and the median over rounds of each step against the peak measured
in its own round.

  python benchmarks/train_step.py --size 512 --batch 2 --rounds 7 --torch

Segmentation (`--masks`): the model with the reference's mask head (`config.model.masks`),
the batch with target masks at 1/`--mask_stride` of the image size, the loss with the mask
terms; `--train_only_mask_head` trains the head alone on the frozen box model (stage 2 of the
reference's recipe). The reference side is then transformers' DetrForSegmentation with its
loss on the same masks (trained parts chosen the same way). The peak memory XLA plans for
our step (arguments, outputs, temporaries) is printed for every run.

  python benchmarks/train_step.py --size 1024 --batch 8 --rounds 4 --dtype bfloat16 --masks
"""

import argparse
import time

import jax
import jax.numpy as jnp
import machine_info
import ml_collections
import numpy as np

from configs import base
from detr_jax import runtime, sharding, train_state
from detr_jax import train_step as step_lib

REFERENCE_TRAINABLE = 41_302_368  # DETR-R50: everything but the stem and layer1


def matmul_peak(dtype=jnp.float32, reps=5):
  """Measured FLOP/s of a large jitted matmul in `dtype` (the machine's practical peak):
  2048^2 on CPU, 8192^2 on accelerators; random operands."""
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    ts.append(time.perf_counter() - t)
  return 2 * n**3 / min(ts)


def _batch(batch, size, num_targets=8, seed=0, mask_stride=0):
  """A training batch of random images and boxes; with `mask_stride` > 0 also `masks`
  [B, 16, size / mask_stride, size / mask_stride] uint8: each box filled."""
  rng = np.random.default_rng(seed)
  valid = np.zeros((batch, 16), bool)
  valid[:, :num_targets] = True
  boxes = np.concatenate(
    [rng.uniform(0.2, 0.8, (batch, 16, 2)), rng.uniform(0.05, 0.3, (batch, 16, 2))], -1
  )
  out = {
    "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
    "labels": rng.integers(1, 91, (batch, 16)).astype(np.int32),
    "boxes": boxes.astype(np.float32),
    "valid": valid,
  }
  if mask_stride:
    side = size // mask_stride
    grid = (np.arange(side) + 0.5) / side
    lo, hi = boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2
    inside_x = (grid >= lo[..., 0, None]) & (grid < hi[..., 0, None])  # [B, 16, side]
    inside_y = (grid >= lo[..., 1, None]) & (grid < hi[..., 1, None])
    out["masks"] = (inside_y[..., :, None] & inside_x[..., None, :]).astype(np.uint8)
  return out


def benchmark_config(
  dtype="float32",
  matcher="auto",
  remat=False,
  conv="auto",
  attention="auto",
  masks=False,
  train_only_mask_head=False,
):
  """configs/base.py (DETR-R50, the reference's optimizer) with the benchmark's switches."""
  config = base.get_config()
  config.model.dtype = dtype
  config.model.remat = remat
  config.model.conv = conv
  config.model.attention = attention
  config.model.masks = masks
  config.model.train_only_mask_head = train_only_mask_head
  config.loss.matcher = matcher
  return config


def build_step(config, size, steps_per_epoch=1000, mesh=None):
  """(the trainer's jitted, donated step `(state, batch) -> (state, metrics)`, its fresh
  state) for `config` at `size` x `size`: forward, matching, set loss, backward, clipped
  AdamW, gradient norm and the non-finite guard (`detr_jax/train_step.py`)."""
  mesh = mesh or sharding.create_mesh()
  config = ml_collections.ConfigDict(config.to_dict())
  config.image_size = (size, size)
  model, tx, step_fn = step_lib.from_config(config, mesh, steps_per_epoch)
  abstract = train_state.abstract_state(model, tx)
  state = train_state.fresh_state(
    model, tx, config, train_state.state_shardings(abstract, mesh, config.fsdp)
  )
  return step_lib.jit_step(step_fn, state, mesh), state


def model_flops(size, batch, dtype="float32", matcher="auto", remat=False, seg=None):
  """FLOPs of one train step with direct convolutions, from XLA's cost analysis of the step
  compiled (never run) for the host CPU: XLA:GPU's cost analysis leaves out the convolutions
  that run as cuDNN calls, so the CPU count is the one comparable across backends.
  `seg`: None, or (mask_stride, train_only_mask_head) for the segmentation model."""
  cpu = jax.devices("cpu")[:1]
  with jax.default_device(cpu[0]):
    config = benchmark_config(
      dtype, matcher, remat, "xla", "xla", seg is not None, bool(seg and seg[1])
    )
    step, state = build_step(config, size, mesh=sharding.create_mesh(cpu))
    lowered = step.lower(state, _batch(batch, size, mask_stride=seg[0] if seg else 0))
    return lowered.compile().cost_analysis().get("flops")


def describe_memory(compiled):
  """XLA's planned memory of a compiled step: arguments, outputs, temporaries (GiB)."""
  m = compiled.memory_analysis()
  if m is None:
    return "memory analysis unavailable"
  gib = lambda n: f"{n / 2**30:.2f}"
  return (
    f"arguments {gib(m.argument_size_in_bytes)} GiB (donated: {gib(m.alias_size_in_bytes)}), "
    f"outputs {gib(m.output_size_in_bytes)}, temporaries {gib(m.temp_size_in_bytes)} GiB"
  )


def make_ours(size, batch, dtype="float32", matcher="auto", remat=False, conv="auto", seg=None):
  """(run one step -> seconds, executed FLOPs as XLA counts them on this backend).
  `seg`: None, or (mask_stride, train_only_mask_head) for the segmentation model."""
  mesh = sharding.create_mesh()
  data = _batch(batch, size, mask_stride=seg[0] if seg else 0)
  data = jax.device_put(data, sharding.data_sharding(mesh))
  config = benchmark_config(
    dtype, matcher, remat, conv, "auto", seg is not None, bool(seg and seg[1])
  )
  step, state = build_step(config, size, mesh=mesh)
  compiled = step.lower(state, data).compile()
  print(f"detr_jax step memory (XLA plan): {describe_memory(compiled)}")
  executed = compiled.cost_analysis().get("flops", float("nan"))
  holder = [state]

  def run():
    t = time.perf_counter()
    holder[0], metrics = compiled(holder[0], data)
    metrics["loss"].block_until_ready()
    return time.perf_counter() - t

  run()
  return run, executed


def make_torch(size, batch, autocast=False, seg=None):
  """Run one step -> seconds, of the transformers PyTorch DETR with the reference loss.
  `seg`: None, or (mask_stride, train_only_mask_head): DetrForSegmentation and its loss."""
  import torch
  from transformers import DetrConfig, DetrForObjectDetection, DetrForSegmentation, ResNetConfig

  device = "cuda" if torch.cuda.is_available() else "cpu"
  stages = ["stage1", "stage2", "stage3", "stage4"] if seg else ["stage4"]
  cfg = DetrConfig(
    use_timm_backbone=False,
    use_pretrained_backbone=False,
    backbone_config=ResNetConfig(out_features=stages),
    num_labels=91,
    auxiliary_loss=True,
    attention_dropout=0.1,
    activation_dropout=0.1,
  )
  if seg:
    model = DetrForSegmentation(cfg).to(device).train()
    backbone = model.detr.model.backbone
  else:
    model = DetrForObjectDetection(cfg).to(device).train()
    backbone = model.model.backbone
  for name, p in backbone.named_parameters():  # stages 1..3 = layer2..layer4
    p.requires_grad_(any(f"stages.{i}." in name for i in (1, 2, 3)))
  expected = REFERENCE_TRAINABLE
  if seg:
    head = [p for n, p in model.named_parameters() if not n.startswith("detr.")]
    expected += sum(p.numel() for p in head)
    if seg[1]:  # stage 2: the head alone
      for p in model.detr.parameters():
        p.requires_grad_(False)
      expected = sum(p.numel() for p in head)
  params = [p for p in model.parameters() if p.requires_grad]
  num_trainable = sum(p.numel() for p in params)
  if num_trainable != expected:
    raise RuntimeError(f"torch DETR trains {num_trainable} parameters, not {expected}")
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
  data = _batch(batch, size, mask_stride=seg[0] if seg else 0)
  images = torch.from_numpy(data["image"].transpose(0, 3, 1, 2).copy()).to(device)
  targets = [
    {
      "class_labels": torch.from_numpy(lab[v]).long().to(device),
      "boxes": torch.from_numpy(b[v]).to(device),
    }
    for lab, b, v in zip(data["labels"], data["boxes"], data["valid"])
  ]
  if seg:
    for target, m, v in zip(targets, data["masks"], data["valid"]):
      target["masks"] = torch.from_numpy(m[v]).float().to(device)

  def run():
    # With labels, transformers computes the reference loss itself: scipy Hungarian matching
    # per image and layer, weighted CE (eos 0.1), L1 x5, GIoU x2, auxiliary losses.
    t = time.perf_counter()
    with torch.autocast(device, enabled=autocast, dtype=torch.bfloat16):
      loss = model(pixel_values=images, labels=targets).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.1)
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - t

  run()
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument(
    "--warmup", type=int, default=2, help="untimed alternating rounds before the timed ones"
  )
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--matcher", default="auto")
  parser.add_argument("--conv", default="auto", help="config.model.conv: auto | xla | matmul")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference")
  parser.add_argument("--no-ours", action="store_true", help="time only the PyTorch reference")
  parser.add_argument("--autocast", action="store_true", help="torch bfloat16 autocast too")
  parser.add_argument("--masks", action="store_true", help="the segmentation model and loss")
  parser.add_argument(
    "--mask_stride", type=int, default=4, help="with --masks: target masks at size / stride"
  )
  parser.add_argument(
    "--train_only_mask_head", action="store_true", help="with --masks: the box model frozen"
  )
  args = parser.parse_args()
  if args.train_only_mask_head and not args.masks:
    parser.error("--train_only_mask_head needs --masks")
  seg = (args.mask_stride, args.train_only_mask_head) if args.masks else None
  kept = runtime.start(tensorflow=False)
  print(machine_info.describe())
  print(f"host_memory.keep_freed_memory: {'applied' if kept else 'off'}")
  flops = model_flops(args.size, args.batch, args.dtype, args.matcher, args.remat, seg)
  runners, executed = {}, None
  if not args.no_ours:
    ours, executed = make_ours(
      args.size, args.batch, args.dtype, args.matcher, args.remat, args.conv, seg
    )
    runners[f"detr_jax ({args.dtype}, conv={args.conv})"] = ours
  if args.torch:
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    runners["torch (transformers), float32"] = make_torch(args.size, args.batch, seg=seg)
    if args.autocast:
      runners["torch (transformers), bf16 autocast"] = make_torch(
        args.size, args.batch, autocast=True, seg=seg
      )
  for _ in range(args.warmup):
    for run in runners.values():
      time.sleep(1.0)
      run()
  times = {name: [] for name in runners}
  peaks = []
  for _ in range(args.rounds):
    peaks.append(matmul_peak(jnp.dtype(args.dtype)))
    for name, run in runners.items():
      time.sleep(1.0)  # let the other runtime's worker threads stop spinning
      times[name].append(run())
  for name, ts in times.items():
    print(f"{name}: {' '.join(f'{t:.3f}' for t in ts)} s")
  peak = float(np.median(peaks))
  # XLA:GPU's count misses cuDNN convolutions; the executed count means something on CPU only.
  show_executed = executed is not None and jax.default_backend() == "cpu"
  executed_note = f", executed {executed / 1e9:.1f} G" if show_executed else ""
  what = "DETR-R50"
  if seg:
    what += f" + mask head (masks at 1/{seg[0]}{', box model frozen' if seg[1] else ''})"
  print(
    f"\n{what} train step, {args.size}x{args.size}, batch {args.batch}, {args.rounds} rounds; "
    f"model FLOPs/step {flops / 1e9:.1f} G{executed_note}; "
    f"{args.dtype} matmul peak {peak / 1e9:.0f} GFLOP/s (median; range {min(peaks) / 1e9:.0f}-"
    f"{max(peaks) / 1e9:.0f})"
  )
  print(
    "| implementation | s/step (median) | range | images/s | model FLOP/s vs peak "
    "| same, per round | time vs torch |"
  )
  print("|---|---|---|---|---|---|---|")
  ref = times.get("torch (transformers), float32")
  for name, ts in times.items():
    t = float(np.median(ts))
    util = f"{100 * flops / t / peak:.0f}%"
    if name.startswith("detr_jax") and show_executed:
      util += f" (executed {100 * executed / t / peak:.0f}%)"
    # Each round's step against the peak measured in that round: steadier on a drifting host.
    per_round = 100 * flops / np.array(ts) / np.array(peaks)
    rounds = f"{np.median(per_round):.0f}% ({per_round.min():.0f}-{per_round.max():.0f}%)"
    ratio = f"{np.median(np.array(ts) / np.array(ref)):.2f}x" if ref else "-"
    span = f"{min(ts):.3f}-{max(ts):.3f}"
    print(f"| {name} | {t:.3f} | {span} | {args.batch / t:.2f} | {util} | {rounds} | {ratio} |")


if __name__ == "__main__":
  main()
