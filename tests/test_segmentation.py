"""The segmentation head (`detr_jax/segmentation.py`, `config.model.masks`): parity with the
transformers DetrForSegmentation, weight import of every segmentation layout, torch-exact
resizing, the frozen-box-model training stage."""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
import torch_detr

from configs import base
from detr_jax import backbone, conv, convert, models, optim, segmentation

K = 7


@functools.cache
def _hf():
  hf = torch_detr.build_hf_detr_segmentation(num_labels=K, seed=0)
  return hf, torch_detr.reference_segmentation_state_dict(hf)


@functools.cache
def _variables():
  return convert.torch_to_flax(_hf()[1], torch_detr.small_segmentation_config(K))


def _images(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _hf_head_key(key):
  return key.startswith(("bbox_attention.", "mask_head."))


@pytest.mark.parametrize("size", [(96, 128), (72, 100)])
def test_outputs_match_transformers_detr_for_segmentation(size):
  """Boxes and logits <= 1e-4, mask logits <= 1e-3 at non-square sizes: 96 x 128 (every
  upsampling exactly 2x) and 72 x 100 (3 x 4 -> 5 x 7 -> ...: torch's nearest indices)."""
  hf, _ = _hf()
  config = torch_detr.small_segmentation_config(K)
  images = _images((2, *size, 3))
  ref_logits, ref_boxes, ref_masks = torch_detr.hf_segmentation_outputs(hf, images)
  out = jax.jit(models.build_model(config).apply)(_variables(), images)
  h4, w4 = (size[0] + 3) // 4, (size[1] + 3) // 4
  assert out["pred_masks"].shape == ref_masks.shape == (2, 10, h4, w4)
  assert out["pred_masks"].dtype == jnp.float32
  # Masks differ between images and over space. (Between queries they barely do: at random
  # init the decoder's outputs are nearly the same for every query, so the per-query paths
  # are checked by the two module tests below, on random queries and maps.)
  assert ref_masks.std(axis=0).mean() > 0.05 and ref_masks.std(axis=(2, 3)).mean() > 0.05
  np.testing.assert_allclose(out["pred_logits"], ref_logits, atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["pred_boxes"], ref_boxes, atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["pred_masks"], ref_masks, atol=1e-3, rtol=0)


def test_parameter_count_equals_transformers():
  hf, _ = _hf()
  ours = models.count_params(_variables()["params"])
  assert ours == sum(p.numel() for p in hf.parameters())
  head = sum(p.numel() for n, p in hf.named_parameters() if _hf_head_key(n))
  v = _variables()["params"]
  assert models.count_params({k: v[k] for k in models.MASK_HEAD_MODULES}) == head


def test_r50_panoptic_parameter_count_equals_transformers():
  """DETR-R50 with the head and the panoptic release's 250 classes: 42,899,288 parameters,
  as transformers' DetrForSegmentation (built on the meta device: no memory, no init)."""
  from transformers import DetrConfig, DetrForSegmentation, ResNetConfig

  stages = ["stage1", "stage2", "stage3", "stage4"]
  cfg = DetrConfig(
    use_timm_backbone=False,
    use_pretrained_backbone=False,
    backbone_config=ResNetConfig(out_features=stages),
    num_labels=250,
  )
  with torch.device("meta"):
    hf = DetrForSegmentation(cfg)
  config = base.get_model_config()
  config.masks, config.num_classes = True, 250
  params = models.abstract_variables(models.build_model(config))["params"]
  assert models.count_params(params) == sum(p.numel() for p in hf.parameters()) == 42_899_288
  head = {k: params[k] for k in models.MASK_HEAD_MODULES}
  assert models.count_params(head) == 1_333_657


@pytest.mark.parametrize("legacy_head_names", [False, True])
def test_transformers_segmentation_layouts_import_like_the_reference(legacy_head_names):
  """DetrForSegmentation's own state dict (transformers 5 module names) and with the head
  under transformers 4's names (the hub's detr-resnet-50-panoptic files) give the same
  variables as the reference DETRsegm layout."""
  hf, _ = _hf()
  sd = {
    torch_detr.segmentation_head_name(k, legacy_head_names) if _hf_head_key(k) else k: v.numpy()
    for k, v in hf.state_dict().items()
  }
  assert any(k.startswith("detr.model.backbone.model.") for k in sd)
  layout, normalized = convert.normalize_state_dict(sd)
  assert layout == "transformers"
  assert "mask_head.gn3.weight" in normalized and "bbox_attention.k_linear.bias" in normalized
  got = convert.torch_to_flax(sd, torch_detr.small_segmentation_config(K))
  jax.tree.map(np.testing.assert_array_equal, got, _variables())


def test_segmentation_files_import(tmp_path):
  """A reference DETRsegm release file (`{'model': ..., 'args': ...}`, `.pth`) and the file
  transformers' save_pretrained writes for DetrForSegmentation (the hub's names: the head as
  in the reference, `detr.model.backbone.conv_encoder.model.*`) read to the same variables."""
  hf, sd = _hf()
  pth = str(tmp_path / "detr-small-panoptic.pth")
  model = {k: torch.from_numpy(v) for k, v in sd.items()}
  torch.save({"model": model, "args": argparse.Namespace(masks=True)}, pth)
  hf.save_pretrained(str(tmp_path / "hf"))
  hub = str(tmp_path / "hf" / "model.safetensors")
  hub_keys = safetensors.numpy.load_file(hub)
  assert "mask_head.lay1.weight" in hub_keys and "bbox_attention.q_linear.bias" in hub_keys
  config = torch_detr.small_segmentation_config(K)
  for path in (pth, hub):
    got = convert.torch_to_flax(convert.load_torch_checkpoint(path), config)
    jax.tree.map(np.testing.assert_array_equal, got, _variables())


def test_box_only_and_segmentation_files_need_the_matching_masks_setting():
  _, sd = _hf()
  box_only = {k[len("detr.") :]: v for k, v in sd.items() if k.startswith("detr.")}
  config = torch_detr.small_segmentation_config(K)
  with pytest.raises(ValueError) as e:
    convert.torch_to_flax(box_only, config)
  msg = str(e.value)
  assert "missing keys" in msg and "bbox_attention.q_linear.weight" in msg
  assert "mask_head.lay1.weight" in msg and "box-only DETR" in msg and "masks=True" in msg
  assert "unexpected" not in msg
  config.masks = False
  with pytest.raises(ValueError) as e:
    convert.torch_to_flax(sd, config)
  msg = str(e.value)
  assert "unexpected keys" in msg and "mask_head.out_lay.weight" in msg
  assert "config.model.masks=False" in msg and "missing" not in msg
  boxes = convert.torch_to_flax(box_only, config)  # the box part alone imports
  jax.tree.map(
    np.testing.assert_array_equal,
    boxes["params"]["transformer"],
    _variables()["params"]["transformer"],
  )


def test_box_model_starts_a_segmentation_model():
  """init_from a box model's workdir into a masks model: the box part is taken, the head keeps
  its fresh init (`convert.merge_pretrained`)."""
  _, sd = _hf()
  config = torch_detr.small_segmentation_config(K)
  config.masks = False
  box = convert.torch_to_flax(
    {k[len("detr.") :]: v for k, v in sd.items() if k.startswith("detr.")}, config
  )
  config.masks = True
  shapes = models.abstract_variables(models.build_model(config))
  fresh = jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), shapes)
  merged, reinit = convert.merge_pretrained(box, fresh)
  assert reinit and all(p.split("/")[1] in models.MASK_HEAD_MODULES for p in reinit)
  assert len(reinit) == len(jax.tree.leaves({k: fresh["params"][k] for k in ("mask_head",)})) + 4
  for name in models.MASK_HEAD_MODULES:
    jax.tree.map(np.testing.assert_array_equal, merged["params"][name], fresh["params"][name])
  jax.tree.map(np.testing.assert_array_equal, merged["batch_stats"], box["batch_stats"])
  np.testing.assert_array_equal(merged["params"]["query_embed"], box["params"]["query_embed"])


def test_attention_maps_match_transformers():
  """MHAttentionMap on random queries (nearly equal in the untrained model) against
  transformers' DetrMHAttentionMap: softmax jointly over heads and positions."""
  from transformers.models.detr.modeling_detr import DetrMHAttentionMap

  torch.manual_seed(0)
  d, heads, (h, w) = 32, 4, (3, 5)
  ref_module = DetrMHAttentionMap(d, heads).eval()
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(2, 6, d)).astype(np.float32)
  memory = rng.normal(size=(2, h, w, d)).astype(np.float32)
  with torch.no_grad():
    mem = torch.from_numpy(np.ascontiguousarray(np.moveaxis(memory, -1, 1)))
    ref = ref_module(torch.from_numpy(queries), mem).numpy()  # [B, Q, heads, h, w]
  params = {
    f"{n}_linear": {
      "kernel": getattr(ref_module, f"{n}_proj").weight.detach().numpy().T,
      "bias": getattr(ref_module, f"{n}_proj").bias.detach().numpy(),
    }
    for n in "qk"
  }
  apply = jax.jit(segmentation.MHAttentionMap(heads, jnp.float32).apply)
  ours = apply({"params": params}, queries, memory)
  np.testing.assert_allclose(ours.sum((2, 3, 4)), 1.0, rtol=1e-5)
  assert ref.std(axis=1).mean() > 0.1 * ref.mean()  # maps differ between queries
  np.testing.assert_allclose(np.moveaxis(np.asarray(ours), -1, 2), ref, atol=1e-6)


def _torch_head_weights(head):
  """Our `mask_head` params from a transformers DetrMaskHeadSmallConv (reference names)."""
  params = {}
  for key, value in head.state_dict().items():
    name = torch_detr.segmentation_head_name("mask_head." + key, legacy=True)
    module, leaf = name.split(".")[1:]
    v = value.numpy()
    if module.startswith("gn"):
      params.setdefault(module, {})["scale" if leaf == "weight" else "bias"] = v
    else:
      params.setdefault(module, {})["kernel" if leaf == "weight" else "bias"] = (
        np.transpose(v, (2, 3, 1, 0)) if leaf == "weight" else v
      )
  return params


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mask_head_matches_transformers_for_every_fpn_size(dtype):
  """The head alone on FPN levels of the same size (the DC5 case), twice the size (phase
  kernels) and an odd size (nearest gather), against transformers' DetrMaskHeadSmallConv."""
  from transformers.models.detr.modeling_detr import DetrMaskHeadSmallConv

  d, heads, b, q, (h, w) = 32, 8, 2, 3, (3, 4)
  fpn_channels, sizes = (24, 16, 8), ((3, 4), (6, 8), (11, 15))
  torch.manual_seed(0)
  head = DetrMaskHeadSmallConv(d + heads, list(fpn_channels), d).eval()
  with torch.no_grad():
    for m in head.modules():
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.kaiming_uniform_(m.weight, a=1)  # the reference's init
      for p in m.parameters(recurse=False):
        if p.ndim == 1:
          p.add_(0.2 * torch.rand(p.shape) - 0.1)
  rng = np.random.default_rng(0)
  src = rng.normal(size=(b, h, w, d)).astype(np.float32)
  maps = jax.nn.softmax(rng.normal(size=(b, q, h * w * heads)), -1).reshape(b, q, h, w, heads)
  maps = np.asarray(maps, np.float32)
  fpns = [rng.normal(size=(b, *s, c)).astype(np.float32) for s, c in zip(sizes, fpn_channels)]
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3)))
  with torch.no_grad():
    ref = head(nchw(src), nchw(maps), [nchw(f) for f in fpns]).numpy()
  ref = ref.reshape(b, q, *sizes[-1])
  apply = jax.jit(segmentation.MaskHead("auto", jnp.dtype(dtype)).apply, static_argnums=4)
  ours = apply({"params": _torch_head_weights(head)}, src, maps, fpns, False)
  assert ours.dtype == jnp.float32 and ours.shape == ref.shape
  tol = 1e-4 if dtype == "float32" else 0.05 * np.abs(ref).max()
  np.testing.assert_allclose(ours, ref, atol=tol, rtol=0)


def test_resizing_matches_torch_interpolate():
  x = np.random.default_rng(0).normal(size=(2, 3, 5, 7)).astype(np.float32)
  t = torch.from_numpy(x)
  for size in [(20, 28), (11, 13), (5, 7), (3, 4)]:  # 4x up, odd up, same, down
    ref = F.interpolate(t, size=size, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(segmentation.resize_bilinear(x, size), ref, atol=1e-6)
    ref = F.interpolate(t, size=size, mode="nearest").numpy()
    got = segmentation.resize_nearest(np.moveaxis(x, 1, -1), size)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(got), -1, 1), ref)


@pytest.mark.parametrize("impl", ["xla", "matmul"])
def test_conv_of_upsampled_input_equals_direct_convolution(impl):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
  w = rng.normal(size=(3, 3, 6, 4)).astype(np.float32)

  @jax.jit
  def direct(x, w):
    return conv.conv2d(segmentation.resize_nearest(x, (6, 10)), w, 1, 1, "xla")

  @jax.jit
  def phases(x, w):
    return segmentation.conv3x3_of_upsampled(x, w, impl, False)

  np.testing.assert_allclose(phases(x, w), direct(x, w), atol=1e-4)
  g = rng.normal(size=(2, 6, 10, 4)).astype(np.float32)
  grad = lambda f: jax.jit(jax.grad(lambda x, w: (f(x, w) * g).sum(), argnums=(0, 1)))(x, w)
  for a, b in zip(grad(phases), grad(direct)):
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_backbone_returns_every_stage_on_request():
  net = lambda stages: backbone.ResNet(
    "resnet18", False, ("layer2", "layer3", "layer4"), jnp.float32, False, "auto", stages
  )
  images = _images((1, 64, 96, 3))
  shapes = jax.eval_shape(lambda: net(False).init(jax.random.key(0), images, False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.1, shapes)
  out = jax.jit(net(True).apply, static_argnums=2)(variables, images, False)
  channels = backbone.stage_channels("resnet18")
  assert [out[f"layer{i}"].shape for i in range(1, 5)] == [
    (1, 64 // s, 96 // s, c) for s, c in zip((4, 8, 16, 32), channels)
  ]
  default = jax.jit(net(False).apply, static_argnums=2)(variables, images, False)
  np.testing.assert_array_equal(out["layer4"], default)
  assert backbone.stage_channels("resnet50") == (256, 512, 1024, 2048)


def test_train_only_mask_head_freezes_the_box_model():
  """No gradient reaches the box model, the head gets one; only the head is trainable and in
  a learning-rate group (the optimizer's masking of frozen groups: tests/test_optim.py)."""
  config = torch_detr.small_segmentation_config(K)
  config.train_only_mask_head = True
  config.conv = "xla"  # XLA:CPU compiles the Winograd (matmul) gradients ~5x slower
  model = models.build_model(config)
  variables = _variables()
  images = _images((2, 64, 64, 3))

  # Random weights on the outputs: a constant cotangent (a plain sum) makes XLA constant-fold
  # the kernel gradients for a minute.
  rng = np.random.default_rng(1)
  weights = {
    k: rng.normal(size=(2, 10, *s)).astype(np.float32)
    for k, s in (("pred_masks", (16, 16)), ("pred_boxes", (4,)), ("pred_logits", (K + 1,)))
  }

  def loss(params):
    out = model.apply(
      {**variables, "params": params}, images, train=True, rngs={"dropout": jax.random.key(0)}
    )
    return sum((out[k] * w).sum() for k, w in weights.items())

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for name, tree in grads.items():
    nonzero = [bool(np.any(np.asarray(g))) for g in jax.tree.leaves(tree)]
    if name in models.MASK_HEAD_MODULES:
      assert all(nonzero), name
    else:
      assert not any(nonzero), name
  mask = models.trainable_mask(variables["params"], config.backbone_trainable, True)
  groups = optim.param_groups(variables["params"], config.backbone_trainable, True)
  for name in variables["params"]:
    head = name in models.MASK_HEAD_MODULES
    assert set(jax.tree.leaves(mask[name])) == {head}, name
    assert set(jax.tree.leaves(groups[name])) == {"transformer" if head else "frozen"}, name
  # Without the flag, the box model trains as before.
  mask = models.trainable_mask(variables["params"], config.backbone_trainable, False)
  assert all(jax.tree.leaves(mask["transformer"])) and all(jax.tree.leaves(mask["mask_head"]))


def test_config_errors_name_the_fields():
  config = torch_detr.small_segmentation_config(K)
  config.masks = False
  config.train_only_mask_head = True
  with pytest.raises(ValueError, match="train_only_mask_head=True needs config.model.masks"):
    models.build_model(config)
  config.masks, config.train_only_mask_head = True, False
  config.hidden_dim, config.num_heads = 48, 8  # 48 / 4 = 12 channels: GroupNorm(8) cannot
  with pytest.raises(ValueError, match="hidden_dim=48, num_heads=8"):
    models.build_model(config)
