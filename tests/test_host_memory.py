"""host_memory.keep_freed_memory: a step's temporary memory stays mapped between calls."""

import json
import os
import subprocess
import sys

import pytest

from detr_jax import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="needs Linux with glibc")

# A jitted function with ~130 MiB of temporaries (a 64 MiB matmul output, a reversed copy);
# reports the median page faults of five calls after two warm-up calls.
SCRIPT = r"""
import json, resource
from detr_jax import host_memory
applied = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
def g(a, b):
  h = jnp.tanh(a @ b)
  return jnp.sum(h) + jnp.sum(jnp.tanh(h.T @ a)) + jnp.sum(h[::-1] * h)
f = jax.jit(g)
a = jnp.ones((8192, 64)) * 1e-3
b = jnp.ones((64, 2048))
for _ in range(2):
  f(a, b).block_until_ready()
counts = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a, b).block_until_ready()
  counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sorted(counts)[2],
                  "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def _run(opt_out):
  env = {k: v for k, v in os.environ.items() if k != host_memory.OPT_OUT_ENV}
  env.update(JAX_PLATFORMS="cpu")
  if opt_out:
    env[host_memory.OPT_OUT_ENV] = "0"
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
  ).stdout
  return json.loads(out.strip().splitlines()[-1])


def _thp_always():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


# The matmul output alone is 64 MiB: 16,384 pages of 4 KiB, faulted in afresh on every call
# when it is a fresh mmap.
OUTPUT_PAGES = 8192 * 2048 * 4 // 4096


def test_temporaries_stay_mapped_and_the_opt_out_keeps_defaults():
  """The mechanism, measured in the same test: with the policy a call faults in a small
  fraction of its temporaries' pages (the count depends on the machine, so the bound is a
  quarter of the output's pages, not a figure seen on one box); without it (opted out)
  JAX's and glibc's defaults stay, and the temporaries are faulted in again on every call."""
  kept, default = _run(opt_out=False), _run(opt_out=True)
  assert kept["applied"] and not kept["async"], kept
  assert not default["applied"] and default["async"], default
  assert kept["faults"] < OUTPUT_PAGES // 4, (kept, default)
  if not _thp_always():  # with transparent huge pages "always" a fresh mmap faults 512x less
    assert default["faults"] >= OUTPUT_PAGES // 4, default
    assert kept["faults"] * 4 < default["faults"], (kept, default)
