"""The "scipy" method: `scipy.optimize.linear_sum_assignment` through one `jax.pure_callback`.

Each problem's valid rows are solved in float64 on the host. There is one callback per call,
under `jax.vmap` as well: the callback receives the whole batch and converts it to NumPy once.
Non-finite costs are first replaced by `sanitize_costs` (semantics in the `detr_jax.matcher`
docstring).
"""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize


def assign_scipy(cost, valid):
  """`assign` with scipy on the host; cost [..., T, Q], valid [..., T] -> int32 [..., T]."""
  if valid.size == 0 or cost.shape[-1] == 0:
    return jnp.full(valid.shape, -1, jnp.int32)
  out_type = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
  return jax.pure_callback(_scipy_host, out_type, cost, valid, vmap_method="broadcast_all")


def _scipy_host(cost, valid):
  """NumPy side of `assign_scipy`; cost [..., T, Q], valid [..., T] -> int32 [..., T]."""
  cost = np.asarray(cost)
  valid = np.asarray(valid, bool)
  t, q = cost.shape[-2:]
  n = int(np.prod(valid.shape[:-1]))
  costs = cost.reshape(n, t, q)
  valids = valid.reshape(n, t)
  out = np.full(valids.shape, -1, np.int32)
  if q == 0:
    return out.reshape(valid.shape)
  # All valid rows at once (sorted by problem), then one slice per problem.
  prob, rows = np.nonzero(valids)
  picked = costs[prob, rows].astype(np.float64)  # [M, Q]
  finite = np.isfinite(picked).all(axis=1)
  counts = np.bincount(prob, minlength=n)
  ends = np.cumsum(counts)
  for b in np.flatnonzero(counts):
    end = ends[b]
    start = end - counts[b]
    sub = picked[start:end]
    if not finite[start:end].all():
      sub = sanitize_costs(sub, min(counts[b], q))
    r, c = scipy.optimize.linear_sum_assignment(sub)
    out[b, rows[start + r]] = c
  return out.reshape(valid.shape)


def sanitize_costs(cost, n):
  """The finite matrix that defines the result for non-finite costs (NumPy, float64).

  Args:
    cost: float [R, C], the valid rows of one problem.
    n: number of pairs to be matched, min(R, C).

  Returns:
    float64 [R, C]: NaN and +inf replaced by `hi + D`, -inf by `lo - D` (`detr_jax.matcher`
    docstring: non-finite costs).
  """
  cost = np.asarray(cost, np.float64)
  finite = np.isfinite(cost)
  lo = cost[finite].min() if finite.any() else 0.0
  hi = cost[finite].max() if finite.any() else 0.0
  span = hi - lo
  amax = max(abs(lo), abs(hi))
  base = span if span > 0 else (amax if amax > 0 else 1.0)
  d = (n + 1) * base
  out = np.where(np.isnan(cost) | (cost == np.inf), hi + d, cost)
  return np.where(cost == -np.inf, lo - d, out)
