"""Runs train.py with a SIGKILL planted at one moment (for tests/test_train.py).

  python tests/train_killed.py MOMENT [train.py flags...]

MOMENT is one of
  checkpoint:N  while checkpoint step N is being written: the async save's thread kills the
                process after it has written an array of step N, before orbax completes it;
  eval:N        during the evaluation at step N, once its first batch has been predicted;
  step:N        right after step N's update.
The process sends itself SIGKILL, as `kill -9` would, at exactly that moment.
"""

import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def die():
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def plant(moment, n):
  if moment == "checkpoint":
    from orbax.checkpoint._src.serialization import serialization

    write = serialization.async_serialize_from_host

    async def write_then_die(rslices, tensorstore_spec, **kwargs):
      await write(rslices, tensorstore_spec, **kwargs)
      if f"/checkpoints/{n}.orbax-checkpoint-tmp" in str(tensorstore_spec):
        die()

    serialization.async_serialize_from_host = write_then_die
  elif moment == "eval":
    from detr_jax import evaluation, postprocess

    evaluate_and_write, to_coco_results = evaluation.evaluate_and_write, postprocess.to_coco_results

    def die_after_first_batch(*args, **kwargs):
      to_coco_results(*args, **kwargs)
      die()

    def evaluate_and_die(*args):
      if args[6] == n:  # (predict_fn, variables, config, info, mesh, workdir, step, ...)
        postprocess.to_coco_results = die_after_first_batch
      return evaluate_and_write(*args)

    evaluation.evaluate_and_write = evaluate_and_die
  elif moment == "step":
    from detr_jax import runtime

    compile_then_sync = runtime.compile_then_sync

    def compile_with_kill(jitted, *args, name):
      compiled = compile_then_sync(jitted, *args, name=name)
      if not name.startswith("train_step"):
        return compiled

      def step(state, batch):
        out = compiled(state, batch)
        if int(out[0]["step"]) == n:
          die()
        return out

      return step

    runtime.compile_then_sync = compile_with_kill
  else:
    raise ValueError(f"unknown moment {moment!r}")


if __name__ == "__main__":
  moment, n = sys.argv[1].split(":")
  sys.path.insert(0, REPO)
  plant(moment, int(n))
  sys.argv = [os.path.join(REPO, "train.py")] + sys.argv[2:]
  runpy.run_path(sys.argv[0], run_name="__main__")
