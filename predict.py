"""Detects objects in image files with a trained (or converted) DETR checkpoint.

  python predict.py --workdir DIR --images 'photos/*.jpg' --output OUT [--attention]

Reads the config saved in the workdir and restores the latest (or --step N) checkpoint.
Images of any size and format PIL reads are resized to the config's image_size like the
eval split; boxes come back in each image's original pixels. Writes OUT/detections.json
(COCO results plus category_name and file_name, scores >= --score_threshold), OUT/images/
STEM.png (the image with boxes, class names and scores) and, with --attention,
OUT/attention/STEM.png and .npz (decoder cross-attention of the top detections and encoder
self-attention at their centers). Unreadable files are reported and skipped. Image ids are
the file names when all are integers (COCO style), else 1..N in sorted path order.
"""

from absl import app, flags, logging

from detr_jax import prediction, runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir written by train.py or detr_jax.convert.")
flags.DEFINE_multi_string("images", None, "Image file, directory or glob (repeatable).")
flags.DEFINE_string("output", None, "Output directory.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_float("score_threshold", 0.5, "Detections below this score are not written.")
flags.DEFINE_integer("batch_size", 8, "Images per model call (the last batch is padded).")
flags.DEFINE_bool("attention", False, "Also write attention-map panels of the top detections.")
flags.DEFINE_integer("num_attention", 3, "Detections per attention panel (the top-scoring).")
flags.DEFINE_multi_string("override", [], "Config overrides FIELD=VALUE (e.g. data.data_dir=/d).")
flags.mark_flags_as_required(["workdir", "images", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.start()
  summary = prediction.predict_files(
    FLAGS.workdir,
    FLAGS.images,
    FLAGS.output,
    step=FLAGS.step,
    score_threshold=FLAGS.score_threshold,
    batch_size=FLAGS.batch_size,
    attention=FLAGS.attention,
    num_attention=FLAGS.num_attention,
    overrides=FLAGS.override,
  )
  logging.info(
    "Step %d: %d images, %d detections, %d skipped",
    summary["step"],
    summary["num_images"],
    summary["num_detections"],
    len(summary["skipped"]),
  )


if __name__ == "__main__":
  app.run(runtime.main_with_user_errors(main))
