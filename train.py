"""Trains DETR.

  python train.py --config configs/tiny.py --workdir /tmp/detr_tiny
  python train.py --config configs/coco_500ep.py --workdir DIR --config.batch_size=64

Resumes from the latest checkpoint in --workdir. Multi-host: on Cloud TPU pods and SLURM
`jax.distributed` is set up automatically; elsewhere pass --coordinator_address,
--num_processes and --process_id to every process.
"""

from absl import app, flags, logging
from ml_collections import config_flags

import input_pipeline
from detr_jax import runtime, trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluation results.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.start(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  result = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info("Finished at step %d: %s", result["step"], result["eval"] or result["train"])


if __name__ == "__main__":
  app.run(runtime.main_with_user_errors(main, input_pipeline.DatasetNotPrepared))
