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
      # Initial backbone weights of a fresh run: "torchvision" (the ImageNet checkpoint of
      # `backbone` that the reference starts from, downloaded once into weights_cache_dir),
      # a local .pth/.safetensors file, a URL, or "" (random). Unused when resuming or with
      # init_from.
      backbone_weights="torchvision",
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
      # Attention kernel: auto (cuDNN flash attention on GPU with bfloat16, else xla) | xla
      # (einsum softmax; attention maps for predict.py) | cudnn.
      attention="auto",
      # Backbone convolutions: auto (matmul on CPU, xla elsewhere) | xla | matmul; see
      # detr_jax/conv.py. Same function, different speed.
      conv="auto",
      # Segmentation: the reference's DETRsegm head (bbox_attention + mask_head) on top of the
      # box model; model.apply also returns pred_masks [B, Q, H/4, W/4] (mask logits).
      masks=False,
      # Stage 2 of the reference's segmentation recipe: the box model is frozen (no gradient,
      # no update); only the mask head trains. Needs masks=True.
      train_only_mask_head=False,
      # Decoder: detr (the reference's) | conditional (Conditional DETR's conditional
      # cross-attention and reference points, detr_jax/conditional.py; post-norm only).
      decoder="detr",
      # Class head and its loss, matching cost and post-processing: softmax (K+1 logits, the
      # last "no object"; cross-entropy with eos_coef; the reference's per-query scores) |
      # sigmoid (K logits, bias prior 0.01; sigmoid focal loss and cost with
      # loss.focal_alpha/gamma; the top num_detections of the Q x K scores per image).
      classifier="softmax",
      num_detections=100,  # sigmoid classifier: detections kept per image (COCO counts 100)
      # Group DETR: training runs groups x num_queries queries, groups that do not see each
      # other in self-attention, each matched one-to-one to the targets, losses averaged over
      # groups; evaluation and prediction run the first group only (a 1-group model's cost).
      groups=1,
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
      # model.masks only (last decoder layer, matched queries): sigmoid focal loss (alpha
      # 0.25, gamma 2) and DICE loss weights; the reference's mask_loss_coef, dice_loss_coef.
      mask_weight=1.0,
      dice_weight=1.0,
      aux_loss=True,
      cost_class=1.0,
      cost_bbox=5.0,
      cost_giou=2.0,
      matcher="auto",  # auto | jax | scipy
      # model.classifier="sigmoid": the sigmoid focal loss's alpha and gamma, also in its
      # matching cost (eos_coef unused).
      focal_alpha=0.25,
      focal_gamma=2.0,
    )
  )


def get_data_config():
  """Input pipeline fields, read by `input_pipeline` (and only there).

  With a fixed output size the reference's multi-scale resize (shorter side 480..800, max
  1333) has no geometric effect, so it has no fields: each training image is sampled once from
  its source window straight to `config.image_size`. What stays random is the flip, the crop
  window and the mosaic.
  """
  return ml_collections.ConfigDict(
    dict(
      # synthetic | coco | voc | coco_folder | coco_panoptic | coco_panoptic_folder
      name="synthetic",
      # coco, voc: TFDS data_dir holding the prepared datasets ("": TFDS's default,
      # $TFDS_DATA_DIR or ~/tensorflow_datasets). The run checks at start that every dataset
      # and split it reads is prepared there, and says how to prepare what is missing.
      data_dir="",
      # coco, voc: True lets the run download and prepare missing TFDS datasets itself
      # (process 0; the other processes wait). COCO 2017 is a 25 GiB download.
      prepare_missing=False,
      # coco (TFDS coco/2017): True maps the 80 TFDS labels to COCO category ids 1..90, so
      # the model has 91 classes like the reference checkpoints; False: labels 0..79.
      # coco_panoptic, coco_panoptic_folder: True makes the panoptic category ids (COCO: up to
      # 200) the labels, with 250 classes as the reference's panoptic model (more if an id is
      # >= 250); False: labels 0..K-1 in sorted category-id order (COCO: 133).
      coco_category_ids_as_labels=True,
      coco_train_split="train",
      coco_eval_split="validation",
      # voc: TFDS "name:split" strings; several train entries are read as their union.
      voc_train_splits=("voc/2007:train+validation", "voc/2012:train+validation"),
      voc_eval_split="voc/2007:test",
      # coco_folder: COCO-format annotations json + image directory per split. Labels are
      # 0..K-1 in sorted category-id order of the train annotations.
      # coco_panoptic_folder: the COCO panoptic json (segments_info per image) + image
      # directory + directory of its segment-id PNGs (*_panoptic_pngs) per split.
      train_annotations="",
      train_images="",
      train_panoptic_pngs="",
      eval_annotations="",
      eval_images="",
      eval_panoptic_pngs="",
      # coco_folder: decode every image once at start-up to find corrupt files (skipped and
      # counted). False only checks that each file exists and has a readable header.
      verify_images=True,
      # synthetic: procedurally drawn shapes, deterministic from synthetic_seed.
      synthetic_num_train=2048,
      synthetic_num_eval=128,
      synthetic_num_classes=4,  # 1..8: rectangle, ellipse, triangle, cross, diamond, ...
      synthetic_image_size=(256, 256),  # (H, W) of the generated images
      synthetic_max_objects=6,
      synthetic_object_size=(0.15, 0.5),  # (min, max) object side / image side
      synthetic_seed=0,
      max_boxes=100,  # static target padding; extra objects are dropped and counted
      # Instance masks: batches also carry masks uint8 [b, max_boxes, H / mask_stride,
      # W / mask_stride] (H, W = config.image_size), slot t the mask of boxes[:, t]. Sources:
      # synthetic, coco_folder (segmentation polygons/RLE), coco_panoptic(_folder).
      masks=False,
      # Output pixels per mask pixel (4: the resolution of the model's pred_masks; 1: full-size
      # targets as the reference's). A mask pixel is 1 when at least half of its area is.
      mask_stride=4,
      shuffle_buffer=1024,  # TFDS sources only; folders and synthetic shuffle whole epochs
      # Augmentations (training only), in order: [mosaic] -> flip -> [crop] -> [photometric,
      # per source image] -> resize to config.image_size -> ImageNet normalization.
      hflip_prob=0.5,
      # The reference's RandomSelect: with crop_prob, resize the shorter side to one of
      # crop_resize_sizes and take a random crop whose sides are drawn from
      # [min(crop_min_size, side / 2), min(side, crop_max_size)].
      crop_prob=0.5,
      crop_resize_sizes=(400, 500, 600),
      crop_min_size=384,
      crop_max_size=600,
      # A crop keeps a box when at least this fraction of its area stays inside; a crop
      # that would keep no box is not applied (the seed re-implementation's rule).
      min_visible_fraction=0.5,
      # Mosaic (seed re-implementation): with mosaic_prob, four images (this one and three
      # random others) each flipped, randomly cropped with mosaic_crop_prob to sides of
      # [mosaic_crop_min_fraction, 1] of the image, fill a 2x2 grid of the output size;
      # the crop step above then applies to the mosaic.
      mosaic_prob=0.0,
      mosaic_crop_prob=0.5,
      mosaic_crop_min_fraction=0.5,
      # Photometric distortion: with photometric_prob, brightness, contrast and
      # saturation factors in [0.5, 1.5] and a hue shift in [-18/255, 18/255] turns.
      photometric=False,
      photometric_prob=0.5,
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

  # Backbones trained from scratch: estimate the frozen BatchNorm statistics from the first
  # training batch (models.calibrate_batch_norm). Ignored when resuming or with init_from.
  config.bn_init_from_data = False
  config.fsdp = False  # shard large parameters and optimizer state over devices
  config.init_from = ""  # workdir or checkpoint dir of a converted/trained model to start from
  # Downloaded weights (model.backbone_weights): "" is $DETR_JAX_CACHE, else ~/.cache/detr_jax.
  config.weights_cache_dir = ""
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.eval_every_steps = 5000
  config.log_every_steps = 50
  config.num_eval_images_to_draw = 4
  config.eval_batch_size = 36
  return config
