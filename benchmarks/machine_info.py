"""One line naming the machine a benchmark ran on, for the tables in docs/benchmarks.md.

The project's CPU box has changed processor between sessions (an AMD EPYC with AVX2, an Intel
Xeon with AVX-512), so every benchmark prints which one it ran on.
"""

import os
import platform

import jax


def cpu_model():
  """The processor's model name from /proc/cpuinfo, or what `platform` knows elsewhere."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def describe():
  """'<cpu model>, <n> cores, Python x, jax y, backend z (<device kind>)'."""
  return (
    f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
    f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind})"
  )
