"""Evaluates a trained (or converted) DETR checkpoint on its config's eval split.

  python eval.py --workdir DIR [--step N] [--config.data.eval_annotations=...]

Reads the config saved in the workdir, restores the latest (or --step N) checkpoint, prints
the COCO table, and writes `eval/step_N_metrics.json` and `eval/step_N_detections.json`.
"""

import json

from absl import app, flags, logging

import input_pipeline
from detr_jax import evaluation, runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir written by train.py or detr_jax.convert.")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_multi_string("override", [], "Config overrides FIELD=VALUE (e.g. data.data_dir=/d).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-host).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.start(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  metrics, step = evaluation.evaluate_workdir(FLAGS.workdir, FLAGS.step, FLAGS.override)
  logging.info("Step %d: %s", step, json.dumps(metrics))


if __name__ == "__main__":
  app.run(runtime.main_with_user_errors(main, input_pipeline.DatasetNotPrepared))
