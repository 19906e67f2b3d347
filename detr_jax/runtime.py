"""Process start-up and the compile policy, shared by every entry point.

`start()` is the first call of train.py, eval.py, predict.py and the benchmarks. In order:
- the host memory policy (`host_memory.keep_freed_memory`: synchronous CPU dispatch, glibc
  keeps freed heap mapped), which must come before JAX creates its CPU client;
- orbax's per-save INFO chatter kept out of the log (its warnings still show);
- TensorFlow (the input pipeline) kept off GPUs and TPUs, so JAX has their memory;
- multi-host JAX (`jax.distributed`), explicit or auto-detected.

`compiler_options()` is what every jitted step, train or predict, compiles with.
`compile_then_sync` lines the processes of a multi-host run up after compiling a step.
"""

import errno
import functools
import logging as std_logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from detr_jax import host_memory, sharding


def start(coordinator_address=None, num_processes=None, process_id=None, *, tensorflow=True):
  """Sets up this process (see the module docstring). Call it before any other JAX work.

  Args:
    coordinator_address, num_processes, process_id: explicit multi-host launch (all three),
      or None to auto-detect (Cloud TPU pods, SLURM; nothing on a single host).
    tensorflow: the program uses the TensorFlow input pipeline (False: never imports it).

  Returns:
    Whether the host memory policy was applied (False when opted out or not on glibc).
  """
  kept = host_memory.keep_freed_memory()
  quiet_orbax_logging()
  if tensorflow:
    import input_pipeline

    input_pipeline.keep_tensorflow_off_accelerators()
  sharding.initialize_distributed(coordinator_address, num_processes, process_id)
  return kept


def quiet_orbax_logging():
  """Keeps orbax's per-save INFO chatter out of the program's log (warnings still show), and
  the tracebacks of its background threads' errors: their one-line message stays, and the
  error reaches the program, which names the step and the cause (`checkpoint.Writer`)."""
  logging.get_absl_handler().addFilter(_orbax_filter)


def _orbax_filter(record):
  if "/orbax/" not in record.pathname:
    return True
  if record.levelno < std_logging.WARNING:
    return False
  record.exc_info = record.exc_text = None
  return True


# XLA:CPU fuses a dot's element-wise consumers into its YNNPACK call with this (experimental)
# option: a DETR-R50 step at 512 x 512 took 2.5-4% less time (docs/benchmarks.md). REDUCE must
# stay in the list: without it XLA rewrites every large reduction (LayerNorm, softmax, the
# gradient norm) into an unfused square + reduce-window, 15x slower (docs/benchmarks.md).
_CPU_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


@functools.cache
def compiler_options():
  """`jax.jit(..., compiler_options=...)` for the default backend: on CPU the epilogue-fusion
  option above, if this jaxlib knows it (a trial compile; an unknown option yields {}); else {}."""
  if jax.default_backend() != "cpu":
    return {}
  try:
    jax.jit(lambda x: x @ x, compiler_options=_CPU_OPTIONS).lower(jnp.ones((2, 2))).compile()
  except Exception:  # an XLA without the option rejects it at compile time
    return {}
  return dict(_CPU_OPTIONS)


class UserError(Exception):
  """An error whose message is the whole answer for the user (what is wrong, where, what to
  do): the entry points print it without a traceback (`main_with_user_errors`)."""


def main_with_user_errors(main, *error_types):
  """`main` for `absl.app.run`, ending with the message alone and exit status 1 on a
  `UserError` or one of `error_types` (e.g. `input_pipeline.DatasetNotPrepared`), and on a
  full disk (an OSError with ENOSPC or EDQUOT, e.g. writing a log file)."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (UserError, *error_types) as e:
      message = str(e)
    except OSError as e:
      if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      message = f"Out of disk space: {e}"
    logging.flush()
    print(f"\nERROR: {message}", file=sys.stderr)
    sys.exit(1)

  return wrapped


def sync_processes(name, timeout=3600):
  """Returns once every process of a multi-process run has called it with `name` (unique per
  barrier); at once in a single-process run. `timeout` in seconds.

  A barrier of `jax.distributed`'s coordination service, not a collective: orbax's default
  `sync_global_processes` is an all-gather, which on CPU is itself a gloo collective with
  gloo's 30 s limit.
  """
  if jax.process_count() > 1:
    from orbax.checkpoint import multihost

    multihost.get_barrier_sync_fn()(key=f"detr_jax_{name}", timeout_ms=int(timeout * 1000))


def check_same_on_all_processes(digest, what):
  """Raises unless every process passes the same `digest` (bytes, e.g. a file's sha256):
  e.g. no host starts training from other weights than process 0's."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  mine = np.frombuffer(digest[:8].ljust(8, b"\0"), np.int64)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
  differ = [i for i, d in enumerate(every) if d != every[0]]
  if differ:
    raise UserError(f"{what} differs between process 0 and processes {differ}")


def all_processes_agree(flag):
  """Whether `flag` is True on every process (at once in a single-process run)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  every = multihost_utils.process_allgather(np.array([bool(flag)], np.int32))
  return bool(np.asarray(every).all())


def compile_then_sync(jitted, *args, name):
  """`jitted` compiled for `args`; in a multi-process run, returned once every process has
  compiled it.

  The first collective of a CPU multi-process run sets up gloo, which waits only 30 s for
  the other processes; on a busy 2-core host one process can reach it more than 30 s after
  another (compiling, building its input pipeline) and the run dies. A coordination-service
  barrier with a long timeout, after compiling, lines the processes up first. `name` must be
  the same on every process and unique per barrier.
  """
  compiled = jitted.lower(*args).compile()
  sync_processes(name)
  return compiled
