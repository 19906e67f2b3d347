"""Conditional DETR-R50 on COCO, the paper's recipe (Meng et al. 2021, arXiv 2108.06152, and
its release Atten4Vis/ConditionalDETR: main.py defaults, scripts/conddetr_r50_epoch50.sh):

300 queries, conditional cross-attention decoder, sigmoid focal classification (alpha 0.25,
gamma 2; matching costs class 2, L1 5, GIoU 2; loss weights class 2, L1 5, GIoU 2; auxiliary
losses), AdamW lr 1e-4, backbone lr 1e-5, weight decay 1e-4, gradient clip 0.1, global batch
16 (8 GPUs x 2), 50 epochs with lr x0.1 at 40, dropout 0.1, ImageNet ResNet-50, the reference
augmentation (flip, random resize-crop). Like every config here the input size is fixed
(1024 x 1024) where the release resizes the shorter side to 800 (max 1333).

  python train.py --config configs/coco_conditional_50ep.py --workdir DIR \\
      --config.data.data_dir=DATA_DIR

Variants (`--config configs/coco_conditional_50ep.py:VARIANT`):
  group       Group DETR on top (Chen et al., arXiv 2207.13085): 11 query groups in training,
              the number the Group DETR release uses with Conditional DETR; 50 epochs.
  group_12ep  the same with the Group DETR release's short schedule
              (scripts/conddetr_r50_epoch12_groupdetr11.sh: 12 epochs, lr drop at 11).
"""

from configs import base

VARIANTS = ("group", "group_12ep")


def get_config(arg=None):
  if arg and arg not in VARIANTS:
    raise ValueError(f"Unknown variant {arg!r} of coco_conditional_50ep.py; choose from {VARIANTS}")
  config = base.get_config()
  config.data.name = "coco"
  config.data.mosaic_prob = 0.0  # the reference augmentation, no mosaic
  m = config.model
  m.num_classes = 91  # COCO category ids used directly, like the release
  m.decoder = "conditional"
  m.classifier = "sigmoid"
  m.num_queries = 300
  m.pre_norm = False
  config.loss.update(class_weight=2.0, bbox_weight=5.0, giou_weight=2.0)
  config.loss.update(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
  config.loss.update(focal_alpha=0.25, focal_gamma=2.0)
  config.batch_size = 16
  config.eval_batch_size = 16
  config.learning_rate = 1e-4
  config.backbone_lr_mult = 0.1
  config.weight_decay = 1e-4
  config.grad_clip_norm = 0.1
  config.num_epochs = 50
  config.lr_drop_epochs = 40
  config.image_size = (1024, 1024)
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 7393  # one epoch of 118,287 images at batch 16
  if arg in ("group", "group_12ep"):
    m.groups = 11
  if arg == "group_12ep":
    config.num_epochs = 12
    config.lr_drop_epochs = 11
  return config
