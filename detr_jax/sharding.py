"""Device mesh, shardings and global batches for data-parallel (optionally FSDP) training.

One mesh axis, "data", spans every device of every host. Batches are sharded along it;
parameters are replicated, or with FSDP each large parameter is split along one dimension
divisible by the device count. XLA inserts the collectives inside the jitted step.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Starts multi-host JAX.

  With no arguments it auto-detects (Cloud TPU pods, SLURM, ...); explicit launches pass
  all three. On a single host with no cluster environment it does nothing.
  """
  if coordinator_address:
    # CPU-only multi-process runs need a collectives backend; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:
    if "coordinator" not in str(e).lower() and "cluster" not in str(e).lower():
      raise


def create_mesh(devices=None):
  """A 1-D mesh, axis "data" (Auto sharding mode), over `devices` (default: all devices of
  all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh(
    (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def data_sharding(mesh):
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh):
  return NamedSharding(mesh, P())


def param_sharding(abstract, mesh, fsdp=False, min_size=2**16):
  """Sharding of each leaf of `abstract`: replicated, or FSDP-split when `fsdp` is True.

  With FSDP a leaf of at least `min_size` values is split over the data axis along its
  largest dimension divisible by the number of devices; other leaves stay replicated.
  """
  n = mesh.shape[DATA_AXIS]

  def one(x):
    if not fsdp or x.size < min_size or n == 1:
      return replicated(mesh)
    dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % n == 0]
    if not dims:
      return replicated(mesh)
    spec = [None] * len(x.shape)
    spec[dims[0]] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(one, abstract)


def global_batch(local_batch, mesh):
  """Per-host NumPy batch (dict of [b, ...]) -> global jax.Arrays sharded over "data"."""
  sharding = data_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
