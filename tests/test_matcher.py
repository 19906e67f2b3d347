"""The Hungarian matcher against scipy.optimize.linear_sum_assignment (float64) as the oracle."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from detr_jax import matcher
from detr_jax.matcher import jax_solver, scipy_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("jax", "scipy")
P = 64  # problems per hypothesis example: the property tests check thousands of problems
SHAPES = ((0, 5), (5, 12), (9, 9), (16, 12), (3, 1))  # (T, Q): T = 0, T < Q, T = Q, T > Q
# Most tests use [P, T, Q] problems of these shapes: the solver is compiled once per shape.


def _check_optimal(cost, valid, out, rtol=1e-6, exact=False):
  """out is a valid assignment of each problem with scipy's optimal total cost.

  The tolerance is relative to the sum of |cost| over scipy's optimal pairs.
  """
  cost = np.asarray(cost, np.float64)
  valid = np.asarray(valid, bool)
  out = np.asarray(out)
  t, q = cost.shape[-2:]
  assert out.shape == valid.shape and out.dtype == np.int32
  n = int(np.prod(valid.shape[:-1]))
  cost, valid, out = cost.reshape(n, t, q), valid.reshape(n, t), out.reshape(n, t)
  for c, v, o in zip(cost, valid, out):
    assert np.all(o[~v] == -1)
    rows = np.flatnonzero(v)
    got = o[rows]
    hit = got >= 0
    assert hit.sum() == min(rows.size, q)
    assert np.all(got[hit] < q) and np.unique(got[hit]).size == hit.sum()
    if rows.size == 0 or q == 0:
      continue
    sub = c[rows]
    r, k = linear_sum_assignment(sub)
    best = sub[r, k].sum()
    ours = sub[np.flatnonzero(hit), got[hit]].sum()
    if exact:
      assert ours == best
    else:
      assert abs(ours - best) <= rtol * np.abs(sub[r, k]).sum(), (ours, best)


def _detr_costs(rng, shape):
  """5 L1 - prob - 2 GIoU of random cxcywh boxes, [..., T, Q]."""
  *lead, t, q = shape

  def boxes(n):
    return np.concatenate(
      [rng.uniform(0.1, 0.9, (*lead, n, 2)), rng.uniform(0.02, 0.5, (*lead, n, 2))], -1
    )

  def xyxy(b):
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)

  tgt, pred = boxes(t)[..., :, None, :], boxes(q)[..., None, :, :]
  l1 = np.abs(tgt - pred).sum(-1)
  a, b = xyxy(tgt), xyxy(pred)
  inter = np.prod(
    np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None), -1
  )
  area_a = np.prod(a[..., 2:] - a[..., :2], -1)
  area_b = np.prod(b[..., 2:] - b[..., :2], -1)
  union = area_a + area_b - inter
  hull = np.prod(np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2]), -1)
  giou = inter / union - (hull - union) / hull
  prob = rng.dirichlet(np.ones(8), size=(*lead, q))[..., rng.integers(0, 8, t)]  # [..., Q, T]
  return (5 * l1 - np.swapaxes(prob, -1, -2) - 2 * giou).astype(np.float32)


def _costs(rng, kind, shape):
  if kind == "uniform":
    return rng.random(shape)
  if kind == "int":  # many ties
    return rng.integers(0, rng.integers(1, 5), shape)
  if kind == "int_wide":
    return rng.integers(-1000, 1000, shape)
  if kind == "detr":
    return _detr_costs(rng, shape)
  if kind == "offset":  # large common offset, small differences
    return 1e4 + rng.random(shape)
  if kind == "rank1":  # structured: many equal-cost assignments
    return rng.random(shape[:-1] + (1,)) * rng.random(shape[:-2] + (1, shape[-1]))
  scale = {"tiny": 1e-30, "small": 1e-6, "big": 1e6, "huge": 1e30, "extreme": 1e37}[kind]
  return rng.normal(size=shape) * scale


KINDS = ("uniform", "int", "int_wide", "detr", "offset", "rank1")
KINDS += ("tiny", "small", "big", "huge", "extreme")


def _valid(rng, pattern, shape):
  t = shape[-1]
  if pattern == "all":
    return np.ones(shape, bool)
  if pattern == "none":
    return np.zeros(shape, bool)
  if pattern == "prefix":
    return np.arange(t) < rng.integers(0, t + 1, shape[:-1] + (1,))
  return rng.random(shape) < rng.random(shape[:-1] + (1,))  # arbitrary per-problem density


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
  shape=st.sampled_from(SHAPES),
  kind=st.sampled_from(KINDS),
  pattern=st.sampled_from(("all", "none", "prefix", "random", "random", "random")),
  seed=st.integers(0, 2**32 - 1),
)
def test_optimal_like_scipy(shape, kind, pattern, seed):
  rng = np.random.default_rng(seed)
  cost = _costs(rng, kind, (P, *shape)).astype(np.float32)
  valid = _valid(rng, pattern, (P, shape[0]))
  for method in METHODS:
    out = matcher.assign(cost, valid, method)
    _check_optimal(cost, valid, out, exact=kind.startswith("int"))


@pytest.mark.parametrize("method", METHODS)
def test_detr_sized_batch(method):
  """[B, L, T, Q] = [4, 6, 100, 100] with COCO-like target counts, arbitrary positions."""
  rng = np.random.default_rng(0)
  cost = _detr_costs(rng, (4, 6, 100, 100))
  counts = [0, 3, 17, 60]
  valid = np.zeros((4, 100), bool)
  for b, n in enumerate(counts):
    valid[b, rng.choice(100, n, replace=False)] = True
  valid = np.broadcast_to(valid[:, None], (4, 6, 100))
  out = matcher.assign(cost, valid, method)
  assert out.shape == (4, 6, 100)
  _check_optimal(cost, valid, out)


@pytest.mark.parametrize("method", METHODS)
def test_jit_and_vmap(method):
  rng = np.random.default_rng(1)
  cost = rng.random((16, 4, 5, 12)).astype(np.float32)
  valid = rng.random((16, 4, 5)) < 0.6
  fn = lambda c, v: matcher.assign(c, v, method)
  ref = fn(cost, valid)
  _check_optimal(cost, valid, ref)
  np.testing.assert_array_equal(jax.jit(jax.vmap(fn))(cost, valid), ref)
  np.testing.assert_array_equal(jax.vmap(fn)(cost, valid), ref)
  np.testing.assert_array_equal(jax.vmap(jax.vmap(fn))(cost, valid), ref)
  # A mask shared over the mapped axis.
  flat = cost.reshape(64, 5, 12)
  shared = jax.vmap(fn, in_axes=(0, None))(flat, valid[0, 0])
  np.testing.assert_array_equal(shared, fn(flat, np.broadcast_to(valid[0, 0], (64, 5))))


@pytest.mark.parametrize("method", METHODS)
def test_low_precision_costs(method):
  rng = np.random.default_rng(7)
  cost = jnp.asarray(rng.random((P, 5, 12)), jnp.bfloat16)
  valid = rng.random((P, 5)) < 0.8
  out = matcher.assign(cost, valid, method)
  _check_optimal(np.asarray(cost.astype(jnp.float32)), valid, out)


def test_vmapped_scipy_is_one_callback(monkeypatch):
  calls = []
  host = scipy_path._scipy_host
  monkeypatch.setattr(scipy_path, "_scipy_host", lambda c, v: calls.append(c.shape) or host(c, v))
  rng = np.random.default_rng(8)
  cost = rng.random((4, 3, 5, 6)).astype(np.float32)
  valid = rng.random((4, 3, 5)) < 0.7
  out = jax.jit(jax.vmap(jax.vmap(lambda c, v: matcher.assign(c, v, "scipy"))))(cost, valid)
  assert calls == [(4, 3, 5, 6)]  # the whole batch in one host call
  _check_optimal(cost, valid, out)


def test_no_gradient_through_matching():
  rng = np.random.default_rng(2)
  cost = jnp.asarray(rng.random((P, 5, 12)).astype(np.float32))
  valid = jnp.ones((P, 5), bool)

  def matched_cost(c):
    idx = matcher.assign(c, valid, "jax")
    return jnp.take_along_axis(c, idx[..., None], -1).sum()

  grad = jax.grad(matched_cost)(cost)  # only the gather contributes: one 1 per target
  np.testing.assert_array_equal(grad.sum(-1), np.ones((P, 5)))


def _oracle_nonfinite(sub):
  """Lexicographic optimum for a matrix with NaN/+-inf: (#(NaN/+inf) - #(-inf), finite part)."""
  pos = np.isnan(sub) | (sub == np.inf)
  neg = sub == -np.inf
  fin = np.where(pos | neg, 0.0, sub)
  lo, hi = (fin[~pos & ~neg].min(), fin[~pos & ~neg].max()) if (~pos & ~neg).any() else (0, 0)
  big = 1e6 * (hi - lo + abs(hi) + abs(lo) + 1)
  model = np.where(pos, hi + big, np.where(neg, lo - big, fin))
  r, k = linear_sum_assignment(model)
  return r, k, pos, neg, np.where(pos, hi, np.where(neg, lo, fin))


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_costs_have_defined_result(method):
  rng = np.random.default_rng(3)
  t, q = 16, 12
  cost = rng.normal(size=(P, t, q)).astype(np.float32)
  u = rng.random(cost.shape)
  cost[u < 0.1] = np.nan
  cost[(u >= 0.1) & (u < 0.2)] = np.inf
  cost[(u >= 0.2) & (u < 0.25)] = -np.inf
  cost[0] = np.nan
  cost[1] = np.inf
  cost[2] = -np.inf
  cost[3, :, :3] = np.inf
  valid = rng.random((P, t)) < rng.random((P, 1))
  valid[:4] = True
  out = np.asarray(matcher.assign(cost, valid, method))
  for c, v, o in zip(cost.astype(np.float64), valid, out):
    rows = np.flatnonzero(v)
    got = o[rows]
    hit = got >= 0
    assert hit.sum() == min(rows.size, q)
    assert np.unique(got[hit]).size == hit.sum()
    if rows.size == 0:
      continue
    r, k, pos, neg, finite_part = _oracle_nonfinite(c[rows])
    mine = np.flatnonzero(hit), got[hit]
    assert (pos[mine].sum() - neg[mine].sum()) == (pos[r, k].sum() - neg[r, k].sum())
    best = finite_part[r, k].sum()
    assert abs(finite_part[mine].sum() - best) <= 1e-5 * (np.abs(finite_part[r, k]).sum() + 1e-30)


@pytest.mark.parametrize("method", METHODS)
def test_padding_never_changes_real_assignments(method):
  rng = np.random.default_rng(4)
  n_real, t, q = 5, 16, 12
  real = rng.random((P, n_real, q)).astype(np.float32)
  padded = rng.normal(size=(P, t, q)).astype(np.float32) * 1e30  # junk, also non-finite
  padded[:, ::3, :2] = np.nan
  padded[:, 1::4, 3] = -np.inf
  valid = np.zeros((P, t), bool)
  for b in range(P):
    valid[b, np.sort(rng.choice(t, n_real, replace=False))] = True
  padded[valid] = real.reshape(-1, q)
  ref = np.asarray(matcher.assign(real, np.ones((P, n_real), bool), method))
  out = np.asarray(matcher.assign(padded, valid, method))
  np.testing.assert_array_equal(out[valid].reshape(P, n_real), ref)
  assert np.all(out[~valid] == -1)


def test_padding_costs_no_loop_steps():
  """The solver loop runs as many steps for 5 targets padded to 40 as for 5 targets."""
  rng = np.random.default_rng(5)
  real = jnp.asarray(rng.random((P, 5, 40)).astype(np.float32))
  valid = np.zeros((P, 40), bool)
  for b in range(P):
    valid[b, rng.choice(40, 5, replace=False)] = True
  padded = np.asarray(rng.random((P, 40, 40)), np.float32)
  padded[valid] = np.asarray(real).reshape(-1, 40)

  @jax.jit
  def steps(cost, rowok):
    bits = jax_solver._pack_bits(rowok)
    n_rows = jnp.sum(jax.lax.population_count(bits), axis=1).astype(jnp.int32)
    fix = jax_solver._identity_params(cost.shape[0])
    return jax_solver._match(cost, bits, n_rows, None, fix)[2]  # [greedy, augmenting] steps

  compact = np.asarray(steps(real, jnp.ones((P, 5), bool)))
  np.testing.assert_array_equal(steps(jnp.asarray(padded), jnp.asarray(valid)), compact)
  assert compact.sum() < 5 * P // 4  # slots work side by side
  np.testing.assert_array_equal(steps(jnp.asarray(padded), jnp.zeros((P, 40), bool)), [0, 0])


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_shapes(method):
  for shape in [(0, 4, 3), (2, 0, 3), (2, 3, 0), (P, 3, 1)]:
    cost = np.ones(shape, np.float32)
    valid = np.zeros(shape[:-1], bool)
    if shape[-1] == 1:
      valid[:, 1] = True  # a single valid target takes the single query
    out = np.asarray(matcher.assign(cost, valid, method))
    assert out.shape == shape[:-1] and out.dtype == np.int32
    np.testing.assert_array_equal(out, np.where(valid, 0, -1))
  # Unbatched single problem.
  out = matcher.assign(np.array([[3.0, 1.0], [1.0, 3.0]], np.float32), np.ones(2, bool), method)
  np.testing.assert_array_equal(out, [1, 0])


def test_bad_arguments():
  with pytest.raises(ValueError, match="method"):
    matcher.assign(np.ones((2, 2)), np.ones(2, bool), "hungarian")
  with pytest.raises(ValueError, match="valid"):
    matcher.assign(np.ones((2, 3, 4)), np.ones((2, 4), bool))


def test_auto_is_a_real_method():
  assert matcher._auto_method(jax.default_backend()) in ("jax", "scipy")
  rng = np.random.default_rng(6)
  cost = rng.random((P, 5, 12)).astype(np.float32)
  valid = np.ones((P, 5), bool)
  _check_optimal(cost, valid, matcher.assign(cost, valid))


_SHARDED_SCRIPT = textwrap.dedent(
  """
  import os
  import re
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec
  from detr_jax import matcher

  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((8,), ("data",))
  rng = np.random.default_rng(0)
  cost = rng.random((16, 6, 10, 12)).astype(np.float32)
  valid = rng.random((16, 6, 10)) < 0.4
  valid[3] = False
  shard = NamedSharding(mesh, PartitionSpec("data"))
  cost_s, valid_s = jax.device_put(cost, shard), jax.device_put(valid, shard)
  collective = re.compile(
    r" (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"
    r"|collective-broadcast|send|recv)(-start|-done)?\\("
  )
  for method in ("jax", "scipy"):
    fn = jax.jit(lambda c, v: matcher.assign(c, v, method, mesh=mesh, data_axis="data"))
    out = fn(cost_s, valid_s)
    assert out.sharding.is_equivalent_to(shard, out.ndim), out.sharding
    ref = matcher.assign(cost, valid, method)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    hlo = fn.lower(cost_s, valid_s).compile().as_text()
    found = collective.findall(hlo)
    assert not found, (method, found)
    assert "while" in hlo or method == "scipy"
  print("sharded ok")
  """
)


def test_sharded_is_shard_local_and_equal():
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "")
  proc = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "sharded ok" in proc.stdout
