"""The seed re-implementation's COCO recipe: DETR-R50 at a fixed 1024 x 1024, 500 epochs.

Global batch 36, AdamW lr 1e-4 for backbone and transformer alike, weight decay 1e-4,
gradient-norm clip 0.1, lr x0.1 at epoch 400, mosaic p = 0.5.

The reference DETR recipe is one override away:
  --config.backbone_lr_mult=0.1 --config.num_epochs=300 --config.lr_drop_epochs=200
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.name = "coco"
  config.data.mosaic_prob = 0.5
  config.model.num_classes = 91  # COCO category ids used directly, like the reference
  config.batch_size = 36
  config.num_epochs = 500
  config.lr_drop_epochs = 400
  config.backbone_lr_mult = 1.0
  config.image_size = (1024, 1024)
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 20000
  return config
