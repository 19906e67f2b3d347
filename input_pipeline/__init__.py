"""tf.data input pipeline for DETR: sources, augmentation, static-shape batches.

API:
  info = input_pipeline.get_dataset_info(config.data)
    -> DatasetInfo: num_classes, label_to_category_id (int64 [K]), class_names, is_thing
       (bool [K]), num_train_examples, num_eval_examples, counters (load-time skips), coco_gt
       (COCO json of the eval split, for pycocotools; with masks its annotations carry
       `segmentation`), panoptic_gt (the eval split's panoptic ground truth, or None).
  it = input_pipeline.create_train_iterator(config.data, image_size=(H, W),
      global_batch_size=B, seed=s, start_step=0, process_index=None, process_count=None)
    Endless iterator of this host's batches (b = B // process_count):
      image  float32 [b, H, W, 3], ImageNet mean/std normalized
      labels int32   [b, T]       (T = config.data.max_boxes; 0 where not valid)
      boxes  float32 [b, T, 4]    cxcywh normalized to [0, 1] of the output image
      valid  bool    [b, T]
      masks  uint8   [b, T, H / s, W / s]  only with `data.masks` (s = `data.mask_stride`):
                                     1 inside the object of slot t, zeros where not valid
    The batch of step s is the same whatever `start_step` the iterator started from.
    `it.counters` counts dropped objects (see below).
  batches = input_pipeline.create_eval_iterator(config.data, image_size=(H, W),
      global_batch_size=B, process_index=None, process_count=None)
    Finite iterable (one pass per `iter()`), the keys above plus
      image_id  int64 [b]     (the id in info.coco_gt)
      orig_size int32 [b, 2]  (height, width of the original image)
      mask      bool  [b]     (False: padding of the last batch)
    Every eval image appears exactly once over all hosts; every host yields the same number
    of batches. `batches.counters` as for training.
  process_index/process_count default to jax.process_index()/jax.process_count().

  labels = input_pipeline.label_space(config.data)
    -> LabelSpace: num_classes, label_to_category_id, class_names, without reading images or
       TFDS data (what `predict.py` needs of the data a model was trained on).
  gt = info.panoptic_gt  (synthetic, coco_panoptic, coco_panoptic_folder; else None)
    -> PanopticGroundTruth: json (COCO panoptic: images, annotations with segments_info,
       categories with isthing), folder (the PNG folder, panopticapi's gt_folder; "" when the
       PNGs are in memory), segments_info(image_id), id_map(image_id) -> int64 [H0, W0]
       segment ids (ids the image's segments_info does not list: 0, VOID).
  The COCO panoptic format: rgb2id, id2rgb, read_panoptic_png, write_panoptic_png,
  load_panoptic, PANOPTIC_OFFSET, PANOPTIC_VOID (`input_pipeline.panoptic_format`;
  `detr_jax.panoptic` re-exports them).
  image = input_pipeline.load_image(path)
    -> uint8 [H0, W0, 3], decoded as the coco_folder pipeline does (UnreadableImageError if
       it is not an image).
  x = input_pipeline.preprocess_eval_image(image, (H, W))
    -> float32 [H, W, 3], the eval split's resize and normalization (the same function).

Start-up, before building the model:
  input_pipeline.keep_tensorflow_off_accelerators()
    Before TensorFlow initializes (no TF op run yet): TensorFlow stays on the CPU.
  input_pipeline.ensure_prepared(config.data, is_coordinator=..., barrier=...)
    Raises DatasetNotPrepared (a message for the user: what is missing, where, the command
    that prepares it, its size, the config fields) unless the TFDS data the config reads is
    prepared; with `data.prepare_missing` process 0 prepares it first.
  input_pipeline.check_prepared(config.data, train=False)
    The same check of the eval split alone, for evaluation (which reads nothing else).

Sources (`config.data.name`):
  synthetic    Procedural shapes (`input_pipeline.synthetic`), generated in memory in a few
               seconds from `synthetic_seed`; labels 0..K-1 are category ids 1..K.
  coco         TFDS coco/2017 from `data_dir` ("": TFDS's default). With
               `coco_category_ids_as_labels` (default) labels are COCO category ids (K = 91,
               "N/A" for the 11 unused ids), like the reference checkpoints; otherwise labels
               0..79 in category-id order.
  voc          TFDS voc (`voc_train_splits`, read as their union; `voc_eval_split`); 20
               classes, category id = label + 1, image ids are a hash of the file name.
  coco_folder  Your own data: a COCO "instances" json (`*_annotations`) and an image
               directory (`*_images`) per split. Labels 0..K-1 in sorted category-id order of
               the train json. Every format PIL reads works: JPEG/PNG/GIF/BMP/WebP are decoded
               by TensorFlow (grayscale, palette, RGBA and CMYK become RGB, alpha is dropped);
               others (TIFF, ...) are converted to PNG in memory at start-up.
  coco_panoptic
               TFDS coco/2017_panoptic (`coco_train_split`, `coco_eval_split`): the 133 COCO
               panoptic categories, things and stuff; each segment of `panoptic_objects` is an
               object (box from its bbox), its mask the pixels of its id in `panoptic_image`.
               With `coco_category_ids_as_labels` (default) labels are the category ids (K =
               250, as the reference's panoptic DETR; "N/A" for unused ids), else 0..132.
  coco_panoptic_folder
               The COCO panoptic format: a panoptic json (`*_annotations`), the image
               directory (`*_images`) and the directory of its segment-id PNGs
               (`*_panoptic_pngs`) per split. Labels as for coco_panoptic, from the train json's
               categories (which need `isthing`): category ids (K = max(250, largest id + 1))
               or 0..K-1 in sorted id order.

Instance masks (`data.masks`, default off: then nothing below runs and the batches are as
without it). Each record carries its objects' masks at the image's full size: coco_folder
decodes each annotation's `segmentation` (polygons, uncompressed or compressed RLE) once at
start-up to a compressed RLE kept in memory and decodes that in NumPy when the image is read;
the panoptic sources and the synthetic dataset compare a panoptic PNG of segment ids with each
object's id (TensorFlow). Masks follow the boxes through every step: a crop or flip slices
them with the image, objects dropped (crowd, crop, degenerate, beyond max_boxes) are dropped
with their masks, and each mask is resampled once, from its source pixels straight to its
place in the output (a mosaic part through the mosaic's crop too): a mask pixel is 1 when at
least half of its `mask_stride` x `mask_stride` output pixels is inside the object, an exact
area average (`input_pipeline.masks`). A crop clips an object's box, as the reference does;
the box stays a clipped box of the whole object, so after a crop a mask may be smaller than
its box, or (rarely) empty. Masks are the visible parts of objects: the synthetic dataset's
never overlap (a later shape hides an earlier one), COCO's instance masks may. The
`coco_gt` of synthetic and coco_folder has every annotation's `segmentation` (RLE) for
pycocotools' `segm` evaluation (crowd regions included); `panoptic_gt` (synthetic,
coco_panoptic, coco_panoptic_folder) has the panoptic json and each image's segment-id map
for PQ. TFDS coco/2017 and voc have no masks: `data.masks` with them is an error.

Training chain (the reference DETR's, plus the seed re-implementation's mosaic; see
configs/base.py for the fields): with `mosaic_prob` a 2x2 mosaic of four images (each
flipped and cropped on its own) of the output size; else the image is flipped with
`hflip_prob`; then with `crop_prob` a random-size crop; then resize to (H, W) without keeping
the aspect ratio; ImageNet normalization. The optional photometric distortion applies to each
source image (each part of a mosaic on its own) before it is resized. Each image is decoded
once (JPEGs only inside the crop window) and resampled once to its place in the output (a
mosaic that is cropped again is resampled twice); the reference's multi-scale resize before a
fixed-size resize would only change the interpolation, so it is not done. Boxes follow every
step exactly, are clipped to the image, and are dropped when a crop leaves less than
`min_visible_fraction` of their area or no area at all (a crop that would leave no box is not
applied). Crowd (COCO) and difficult (VOC) objects are never training targets; they stay in
`coco_gt` as `iscrowd` regions. Eval: the whole image resized to (H, W).

Determinism and resumption: every random choice is a stateless function of (seed, example
position in the run); shuffling is a per-epoch permutation (folders, synthetic: the exact
`index_shuffle` permutation of the whole split, position -> image, so starting at step k
computes it directly; TFDS: each host shuffles its `tfds.even_splits` shard with a buffer
seeded per epoch, and starting at step k reads at most one epoch of undecoded records).
`keep_tensorflow_off_accelerators()` hides GPUs and TPUs from TensorFlow, so it never takes
accelerator memory; programs call it at start-up (importing the package does not).

Bad input (coco_folder; checked once when the source is built):
  * annotations json missing, not JSON, or without images/annotations/categories lists:
    error naming the file.
  * annotation whose category_id is not in the train json's categories: error naming the
    json, annotation id, image file and category id. Annotation referring to an image id not
    in `images`, duplicate image/annotation/category ids: error naming them.
  * image file missing, unreadable header, size different from the json's width/height, or
    (with `verify_images`, the default) not decodable by TensorFlow (corrupt, truncated): the
    image and its annotations are skipped, counted in `info.counters['<split>/skipped_images']`
    and logged with the file name and reason. With `verify_images=False` a file that is
    corrupt past its header makes the iterator raise TensorFlow's decode error.
  * bbox that is not 4 numbers, NaN/infinite, zero or negative width/height, or entirely
    outside the image: the annotation is skipped, counted in
    `info.counters['<split>/invalid_boxes']` and logged with its annotation id and file.
  * bbox partly outside the image: clipped to it, counted in `<split>/clipped_boxes`.
  * image without annotations: kept (no targets in training, evaluated as an image with no
    objects), counted in `<split>/images_without_annotations`.
  * with `data.masks`: an unusable `segmentation` (missing, empty, only polygons of fewer
    than 3 points, an RLE whose size is not the image's or whose counts do not sum to its
    pixels, no pixel inside the image): the annotation is skipped, counted in
    `<split>/invalid_masks` and logged with its annotation id and file; degenerate parts of a
    polygon list that has valid ones are dropped (`<split>/degenerate_polygons`).
Bad input (coco_panoptic_folder; checked once when the source is built): images as above;
  a panoptic PNG missing, unreadable, not RGB, of another size than its image, or not
  decodable (with `verify_images`), or an image without a panoptic annotation: the image is
  skipped (`<split>/skipped_images`); with `verify_images`, a segment whose id is not in its
  PNG: the segment is skipped (`<split>/missing_segments`), and ids in a PNG that its
  segments_info does not list: their pixels are VOID (`<split>/unlisted_segments`); a segment
  bbox that is not a box inside the image: no training target (`<split>/invalid_boxes`) but
  still a segment of `panoptic_gt`. Each is logged with the file and segment id. A malformed
  json (unknown image or category id, duplicate ids, a segment id outside [1, 256^3),
  categories without `isthing`) is an error naming the json, image and segment.
TFDS sources are checked while iterating: NaN or no-area boxes are dropped and counted in
`it.counters['invalid_boxes']` (and `info.counters['eval/invalid_boxes']` for coco_gt); with
masks, objects whose segment id is not in the panoptic PNG are dropped and counted in
`it.counters['invalid_masks']`.
Objects beyond `max_boxes` (after augmentation) are dropped, never an error: counted in
`it.counters['truncated_boxes']` and logged the first time.
"""

import logging

import tensorflow as tf

from input_pipeline.images import UnreadableImageError, load_image, preprocess_eval_image
from input_pipeline.panoptic_format import OFFSET as PANOPTIC_OFFSET
from input_pipeline.panoptic_format import VOID as PANOPTIC_VOID
from input_pipeline.panoptic_format import (
  PanopticGroundTruth,
  id2rgb,
  load_panoptic,
  read_panoptic_png,
  rgb2id,
  write_panoptic_png,
)
from input_pipeline.pipeline import (
  DatasetInfo,
  create_eval_iterator,
  create_train_iterator,
  get_dataset_info,
)
from input_pipeline.preparation import DatasetNotPrepared, check_prepared, ensure_prepared
from input_pipeline.sources import LabelSpace, label_space


def keep_tensorflow_off_accelerators():
  """Hides GPUs and TPUs from TensorFlow so JAX has the accelerators' memory to itself.

  Call it before TensorFlow initializes its devices (before the first TF op); later it can
  no longer hide them and logs a warning if TensorFlow holds any.
  """
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except ValueError:  # TensorFlow has no such device type (tensorflow-cpu has no GPU).
      pass
    except RuntimeError as e:  # TensorFlow already initialized its devices.
      if tf.config.get_visible_devices(kind):
        logging.warning(
          "input_pipeline: TensorFlow initialized its devices before "
          "keep_tensorflow_off_accelerators() and may hold %s memory; call it first. (%s)",
          kind,
          e,
        )


__all__ = [
  "PANOPTIC_OFFSET",
  "PANOPTIC_VOID",
  "DatasetInfo",
  "DatasetNotPrepared",
  "LabelSpace",
  "PanopticGroundTruth",
  "UnreadableImageError",
  "check_prepared",
  "create_eval_iterator",
  "create_train_iterator",
  "ensure_prepared",
  "get_dataset_info",
  "id2rgb",
  "keep_tensorflow_off_accelerators",
  "label_space",
  "load_image",
  "load_panoptic",
  "preprocess_eval_image",
  "read_panoptic_png",
  "rgb2id",
  "write_panoptic_png",
]
