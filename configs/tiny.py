"""A small DETR on the built-in synthetic dataset: trains on a 2-core CPU in minutes.

python train.py --config configs/tiny.py --workdir /tmp/detr_tiny

Measured with that command on the quiet 2-core CPU box (Intel Xeon, AVX-512): about 31
images/s, COCO AP50 0.52-0.54 after 1800 steps (8.5 minutes from the command), 0.78-0.86 at
20 minutes; the whole 20-epoch run ends in 22-24 minutes at AP50 0.79-0.86 (two runs). Since
`host_memory.keep_freed_memory` training runs at 35.5-36 images/s (measured over 200 steps;
the full run not yet repeated). See docs/benchmarks.md.

Variants, comma-separated (`--config configs/tiny.py:conditional,group`), for the convergence
benchmark (benchmarks/convergence.py):
  conditional  Conditional DETR's decoder and its sigmoid focal classification (post-norm,
               class loss weight and matching cost 2, as configs/coco_conditional_50ep.py);
  group        Group DETR: 11 query groups in training (one in evaluation);
  harder       more, smaller objects: up to 10 per image, sides 8-25% of the image side,
               20 queries.
  masks        segmentation: the reference's mask head trained with the box model on the
               synthetic shapes' exact masks (targets at the predictions' 1/4 resolution);
               evaluated on boxes, instance masks (pycocotools segm) and PQ.
  masks_stage1 the reference's two stages instead: first the box model of `masks` alone
  masks_stage2 (8 attention heads, as the mask head needs), then its head alone on the frozen
               box model (`--config.init_from=STAGE1_WORKDIR`), learning rate 5e-4:
                 python train.py --config configs/tiny.py:masks_stage1 --workdir /tmp/box
                 python train.py --config configs/tiny.py:masks_stage2 --workdir /tmp/masks \
                     --config.init_from=/tmp/box
"""

from configs import base

VARIANTS = ("conditional", "group", "harder", "masks", "masks_stage1", "masks_stage2")


def get_config(arg=None):
  variants = [v for v in (arg or "").split(",") if v]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise ValueError(f"Unknown variant(s) {unknown} of tiny.py; choose from {VARIANTS}")
  config = base.get_config()
  config.data.name = "synthetic"
  config.data.mosaic_prob = 0.0
  config.data.max_boxes = 8
  config.data.crop_resize_sizes = (160, 192, 224)
  config.data.crop_min_size = 128
  config.data.crop_max_size = 224
  config.data.shuffle_buffer = 512
  config.data.synthetic_max_objects = 3

  m = config.model
  m.backbone = "resnet18"
  m.backbone_weights = ""  # random: the quickstart and the tests download nothing
  m.backbone_trainable = ("stem", "layer1", "layer2", "layer3", "layer4")
  m.num_classes = config.data.synthetic_num_classes
  m.num_queries = 10
  m.hidden_dim = 128
  m.num_heads = 4
  m.num_encoder_layers = 2
  m.num_decoder_layers = 3
  m.dim_feedforward = 256
  m.dropout = 0.0
  m.pre_norm = True  # converged faster than post-norm here (AP50 0.07 vs 0.02 at step 300)

  config.batch_size = 8
  config.eval_batch_size = 32
  config.image_size = (128, 128)
  config.num_epochs = 20
  config.lr_drop_epochs = 15
  config.learning_rate = 1e-4
  config.warmup_steps = 100
  config.checkpoint_every_steps = 300
  config.eval_every_steps = 300
  config.log_every_steps = 20

  if "conditional" in variants:
    m.update(decoder="conditional", classifier="sigmoid", pre_norm=False)
    config.loss.update(class_weight=2.0, cost_class=2.0)
  if "group" in variants:
    m.groups = 11
  if "harder" in variants:
    config.data.update(synthetic_max_objects=10, synthetic_object_size=(0.08, 0.25))
    config.data.max_boxes = 16
    m.num_queries = 20
  if {"masks", "masks_stage1", "masks_stage2"} & set(variants):
    m.num_heads = 8  # the head's GroupNorm(8) needs hidden_dim + num_heads divisible by 8
  if {"masks", "masks_stage2"} & set(variants):
    m.masks = True
    config.data.masks = True
  if "masks_stage2" in variants:
    m.train_only_mask_head = True
    config.learning_rate = 5e-4  # the head alone: PQ 0.573 vs 0.492 at step 1200 with 1e-4
  return config
