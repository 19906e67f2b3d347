"""Panoptic DETR-R50 on COCO panoptic, in the reference's two stages (its README, "Panoptic
segmentation"): first the box model on COCO panoptic's things and stuff, then the mask head
alone on the frozen box model.

  # Stage 1: the box model, 250 classes (panoptic category ids used as labels, as the
  # reference), the seed's 500-epoch recipe at a fixed 1024 x 1024 (--config.num_epochs etc.
  # to change it).
  python train.py --config configs/coco_panoptic.py --workdir /ckpt/panoptic_box \
      --config.data.data_dir=DATA_DIR
  # Stage 2: the mask head (model.masks) for 25 epochs, lr x0.1 at 15, box model frozen.
  python train.py --config configs/coco_panoptic.py:masks --workdir /ckpt/panoptic \
      --config.init_from=/ckpt/panoptic_box --config.data.data_dir=DATA_DIR
  python eval.py --workdir /ckpt/panoptic   # box AP, mask AP where available, PQ

TFDS `coco/2017_panoptic` holds the panoptic PNGs and segments (19.57 GiB download). Mask AP
needs instance segmentations in the ground truth: for the reference's mask AP use a
`coco_folder` with `instances_val2017.json` (`--override data.name=coco_folder ...`).
"""

from configs import base

VARIANTS = ("masks",)


def get_config(arg=None):
  if arg and arg not in VARIANTS:
    raise ValueError(f"Unknown variant {arg!r} of coco_panoptic.py; choose from {VARIANTS}")
  config = base.get_config()
  config.data.name = "coco_panoptic"
  config.data.mosaic_prob = 0.5
  config.model.num_classes = 250  # panoptic category ids (things 1..90, stuff 92..200)
  config.batch_size = 36
  config.num_epochs = 500
  config.lr_drop_epochs = 400
  config.image_size = (1024, 1024)
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 20000
  if arg == "masks":
    config.model.masks = True
    config.model.train_only_mask_head = True
    config.data.masks = True
    config.data.mosaic_prob = 0.0  # the reference's stage 2 uses its detection augmentation
    config.num_epochs = 25
    config.lr_drop_epochs = 15
  return config
