"""Hungarian matcher: exact linear sum assignment inside jit, batched and shard-local.

`assign(cost, valid)` matches the targets of each problem (rows of `cost`) to queries (columns)
so that the total cost is minimal, exactly like `scipy.optimize.linear_sum_assignment` on the
valid rows. The DETR loss calls it once per step on `cost: [B, L, T, Q]` (B images, L decoder
layers, T padded targets, Q queries).

Methods
-------
`"jax"`: a pure-JAX solver of the Jonker-Volgenant / Crouse family that scipy also implements
(a greedy start, then shortest augmenting paths), batched over all problems in two
`lax.while_loop`s; `jax_solver.py` describes the algorithm and its cost.

`"scipy"`: `scipy.optimize.linear_sum_assignment` on each problem's valid rows, in float64, via
one `jax.pure_callback` per call (`scipy_path.py`).

`"auto"`: `"jax"` on every backend. On the CPU it is measured faster than the scipy callback
(docs/benchmarks.md, `python benchmarks/matcher.py`). On GPU/TPU it is chosen unmeasured: it
needs no device-host round trip inside the step and no host callbacks that serialize across
devices; re-run the benchmark there to confirm.

Semantics shared by both methods
--------------------------------
* Rectangular problems: with n valid targets and Q queries, exactly min(n, Q) targets are
  matched, each to a distinct query, with minimal total cost. If n > Q the Q matched targets are
  the optimal subset (the problem is solved transposed) and the other valid targets get -1.
  Invalid (padded) targets always get -1 and never change the result of the valid ones,
  whatever their costs and wherever they sit in the padding pattern.
* Non-finite costs: a problem's NaN and +inf entries are replaced by `hi + D` and -inf entries
  by `lo - D`, where `lo`/`hi` are the smallest/largest finite costs among its valid rows and
  `D = (min(n, Q) + 1) * (hi - lo)` (or `max(|lo|, |hi|)`, or 1, when that is 0); the result is
  the optimal assignment of that finite matrix. So the matcher first minimizes (number of
  NaN/+inf entries used - number of -inf entries used), then the finite cost (NaN/+inf counted
  as `hi`, -inf as `lo`); it never hangs or fails. Subnormal costs may count as 0.
* Ties: any optimal assignment may be returned; the two methods can differ on ties.
* Precision: "jax" is exact up to float32 rounding of the dual updates: in the tests its total
  cost equals scipy's float64 optimum to a relative 1e-6 (of the sum of |cost| over the matched
  entries). Integer-valued costs with |cost| * (min(n, Q) + 1) < 2^24 are solved exactly (all
  dual arithmetic stays on exact integers).
* No gradient flows through matching (the cost is wrapped in `stop_gradient`); the result is
  int32.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from detr_jax.matcher import jax_solver, scipy_path

METHODS = ("auto", "jax", "scipy")


def assign(cost, valid, method="auto", *, mesh=None, data_axis="data"):
  """Optimal target -> query assignment of every problem in a batch.

  Args:
    cost: float [..., T, Q]; `cost[..., t, q]` is the cost of matching target t to query q.
      Leading dims are batch dims (e.g. `[B, L]` images x decoder layers).
    valid: bool [..., T]; False marks padded targets.
    method: "auto" | "jax" | "scipy" (see the package docstring).
    mesh: optional `jax.sharding.Mesh`. Then the first dim of `cost`/`valid` is the image batch,
      sharded over mesh axis `data_axis`, and every device solves its own shard (`shard_map`,
      no communication).
    data_axis: the mesh axis name of the batch dim.

  Returns:
    int32 [..., T]: the query assigned to each target; -1 for invalid targets and, when a
    problem has more valid targets than queries, for the valid targets left unmatched.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  cost = lax.stop_gradient(jnp.asarray(cost))
  valid = lax.stop_gradient(jnp.asarray(valid)).astype(bool)
  if cost.ndim < 2 or valid.shape != cost.shape[:-1]:
    raise ValueError(f"need cost [..., T, Q] and valid [..., T], got {cost.shape}, {valid.shape}")
  if method == "auto":
    method = _auto_method(jax.default_backend())
  local = jax_solver.assign_jax if method == "jax" else scipy_path.assign_scipy
  if mesh is None:
    return local(cost, valid)
  if cost.ndim < 3:
    raise ValueError(f"with a mesh, cost needs a leading batch dim, got {cost.shape}")
  spec = PartitionSpec(data_axis)
  # Per-device solve without collectives; check_vma=False because the solver's loop state starts
  # from device-invariant constants.
  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
  return sharded(cost, valid)


def _auto_method(backend):
  """The faster method on `backend` (measurements in docs/benchmarks.md)."""
  del backend  # "jax" measured faster on CPU; chosen unmeasured on accelerators (no callback).
  return "jax"
