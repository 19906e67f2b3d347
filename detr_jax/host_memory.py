"""Keeps XLA:CPU's per-step temporary memory mapped between steps.

XLA:CPU allocates the temporary buffers of a compiled step afresh at every call (DETR-R50 at
512 x 512, batch 2: about 0.9 GB). By default JAX runs CPU executions on a worker thread,
whose glibc arena hands blocks that large out as fresh `mmap`s and unmaps them when freed:
every step then faults in ~228,000 new 4 KiB pages, which the kernel zeroes one by one
(0.34 CPU-s per step on the 2-core box). `keep_freed_memory` makes the step run on the
calling thread (`jax_cpu_enable_async_dispatch=False`), whose main arena can serve any size
from the heap, and tells glibc to serve large blocks from the heap and never give freed heap
memory back (`mallopt`). The faults go to ~125 per step and steps get 7-22% faster
(docs/benchmarks.md). The costs: the process keeps its peak heap mapped (tiny config: peak
RSS 2.45 -> 2.70 GB), and Python waits for each CPU execution instead of queueing the next
(the input pipeline runs in tf.data's threads either way; the tiny config's training got
faster, 31 -> 36 images/s, not slower).

Call it at program start, before JAX creates its CPU client (the dispatch setting is read
then; the platform is not known yet, so it applies on GPU and TPU hosts too, where the
dispatch setting touches only JAX's host-side CPU client and the heap setting still keeps
the peak heap). Set DETR_JAX_KEEP_HOST_MEMORY=0 to keep JAX's and glibc's defaults.
"""

import ctypes
import os
import sys

import jax

OPT_OUT_ENV = "DETR_JAX_KEEP_HOST_MEMORY"

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


def _glibc():
  """The C library if it is glibc, else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
      return None
    return ctypes.CDLL("libc.so.6")
  except (ValueError, OSError):
    return None


def keep_freed_memory():
  """Synchronous CPU dispatch and glibc heap settings, unless opted out (see module doc).

  Returns True when the settings were applied.
  """
  if os.environ.get(OPT_OUT_ENV, "1") == "0":
    return False
  libc = _glibc()
  if libc is None:
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  ok = libc.mallopt(_M_MMAP_MAX, 0)  # large blocks from the heap, not fresh mmaps
  ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # never shrink the heap
  ok &= libc.mallopt(_M_TOP_PAD, 256 << 20)  # grow it in 256 MiB steps
  return bool(ok)
