"""DETR-R50 on Pascal VOC: train on 2007+2012 trainval, evaluate on 2007 test (20 classes)."""

from configs import base


def get_config():
  config = base.get_config()
  config.data.name = "voc"
  config.data.mosaic_prob = 0.5
  config.model.num_classes = 20
  config.batch_size = 32
  config.num_epochs = 150
  config.lr_drop_epochs = 100
  config.image_size = (640, 640)
  config.checkpoint_every_steps = 1000
  config.eval_every_steps = 5000
  config.eval_batch_size = 32
  return config
