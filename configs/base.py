"""Every field a detr_jax config has, with its one default (the reference DETR-R50 values).

Experiment configs (`coco_500ep.py`, `voc.py`, `tiny.py`) start from `get_config()` here and
override what differs. Code reads these fields in one place per subsystem; it never supplies
its own defaults.
"""

import ml_collections


def get_model_config():
  """DETR model fields, read by `detr_jax.models.build_model`."""
  return ml_collections.ConfigDict(
    dict(
      backbone="resnet50",  # resnet18 | resnet34 | resnet50 | resnet101
      dilation=False,  # DC5: layer4 dilated, output stride 16
      # Backbone parts that train. Reference: stem and layer1 frozen.
      backbone_trainable=("layer2", "layer3", "layer4"),
      num_classes=91,  # logits = num_classes + 1; the last is "no object"
      num_queries=100,
      hidden_dim=256,
      num_heads=8,
      num_encoder_layers=6,
      num_decoder_layers=6,
      dim_feedforward=2048,
      dropout=0.1,
      pre_norm=False,
      dtype="float32",  # compute dtype: float32 | bfloat16 (params stay float32)
      remat=False,  # rematerialize transformer layers in the backward pass
      attention="xla",  # xla | cudnn (jax.nn.dot_product_attention implementation)
    )
  )


def get_loss_config():
  """Set loss and matcher fields, read by `detr_jax.loss`."""
  return ml_collections.ConfigDict(
    dict(
      class_weight=1.0,
      bbox_weight=5.0,
      giou_weight=2.0,
      eos_coef=0.1,
      aux_loss=True,
      cost_class=1.0,
      cost_bbox=5.0,
      cost_giou=2.0,
      matcher="auto",  # auto | jax | scipy
    )
  )


def get_data_config():
  """Input pipeline fields, read by `input_pipeline`."""
  return ml_collections.ConfigDict(
    dict(
      # synthetic | coco | voc | coco_folder
      name="synthetic",
      data_dir=None,  # TFDS data_dir (None: TFDS default)
      # coco: TFDS labels are mapped to COCO category ids (num_classes 91, like the
      # reference); otherwise labels are contiguous 0..K-1.
      coco_category_ids_as_labels=True,
      voc_train_splits=("voc/2007:train+validation", "voc/2012:train+validation"),
      voc_eval_split="voc/2007:test",
      # coco_folder: annotations.json + image directory per split.
      train_annotations="",
      train_images="",
      eval_annotations="",
      eval_images="",
      # synthetic dataset
      synthetic_num_train=2048,
      synthetic_num_eval=128,
      synthetic_num_classes=4,
      synthetic_image_size=(256, 256),
      synthetic_max_objects=6,
      synthetic_seed=0,
      max_boxes=100,  # static target padding; extra objects are dropped and counted
      shuffle_buffer=1024,
      # augmentations
      hflip_prob=0.5,
      multiscale_sizes=tuple(range(480, 801, 32)),
      multiscale_max_size=1333,
      crop_resize_sizes=(400, 500, 600),
      crop_min_size=384,
      crop_max_size=600,
      mosaic_prob=0.0,
      photometric=False,
    )
  )


def get_config():
  """The full default config (reference DETR-R50 model and loss, COCO-like schedule)."""
  config = ml_collections.ConfigDict()
  config.model = get_model_config()
  config.loss = get_loss_config()
  config.data = get_data_config()

  config.batch_size = 36  # global
  config.num_epochs = 500
  config.num_train_steps = -1  # wins over num_epochs when > 0
  config.image_size = (1024, 1024)  # (H, W); fixed, divisible by the backbone stride
  config.seed = 42

  config.learning_rate = 1e-4
  config.backbone_lr_mult = 1.0  # reference: 0.1
  config.weight_decay = 1e-4
  config.grad_clip_norm = 0.1
  config.lr_drop_epochs = 400  # lr x lr_drop_factor at this epoch
  config.lr_drop_factor = 0.1
  config.warmup_steps = 0

  config.init_from = ""  # workdir or checkpoint dir of a converted/trained model to start from
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.eval_every_steps = 5000
  config.log_every_steps = 50
  config.num_eval_images_to_draw = 4
  config.eval_batch_size = 36
  return config
