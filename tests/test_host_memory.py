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


def test_temporaries_stay_mapped():
  result = _run(opt_out=False)
  assert result["applied"] and not result["async"]
  assert result["faults"] < 1000, result  # the 64 MiB matmul output alone is 16,384 pages


def test_opt_out_keeps_defaults():
  result = _run(opt_out=True)
  assert not result["applied"] and result["async"]
  if not _thp_always():
    # glibc's default: the temporary is a fresh mmap on every call, faulted in page by page.
    assert result["faults"] >= 4096, result
