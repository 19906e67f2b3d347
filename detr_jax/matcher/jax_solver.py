"""The "jax" method: a batched pure-JAX linear sum assignment solver.

A solver of the Jonker-Volgenant / Crouse family that scipy also implements (a greedy start,
then shortest augmenting paths with Dijkstra on reduced costs), written for a batch of N
problems in two `lax.while_loop`s. `assign_jax` is the entry point of `detr_jax.matcher.assign`;
the semantics it shares with the scipy method are in the `detr_jax.matcher` docstring.

* Greedy start: with row duals u = row minimum and column duals v = 0, each valid row takes a
  free column among its minima, in row order; rows that find none are left for the second
  loop. Every matched pair is tight and no reduced cost is negative, so this is a valid start
  for augmenting paths. A loop step takes the next 8 valid rows of a problem in each of S1
  slots (S1 about N/8): O(S1 * 8 * Q). On DETR-like costs most rows end here
  (docs/benchmarks.md).
* Augmenting paths for the rows left: each problem keeps column duals `v [Q]`, the row of each
  column `row4col [Q]` and, while it grows one augmenting path, the Dijkstra labels of the
  columns (shortest reduced path cost, predecessor row and column, visited flag) and a bit mask
  of each column's path ancestors (ceil(Q / 32) uint32 words). Row duals are never stored: a
  matched row is tight on its column, so `u[i] = cost[i, col[i]] - v[col[i]]` is recomputed
  when the row is reached; the free row starts from u = 0 (its first labels are c - v; only
  label differences enter the updates). One loop step relaxes one row (O(Q)): it gathers
  that row of `cost`, updates the labels, and visits the cheapest unvisited column (a free one
  among equal labels). A free column ends the search: columns on the path (read off the
  ancestor mask, no sequential walk) take their new rows and visited columns get
  `v -= min_label - label`, both O(Q). S slots (about N/12) work side by side.
* Both loops take problems from a queue sorted by number of rows, largest first; a slot that
  finishes its problem writes it back and takes the next one in the same step. So the trip
  count is about max(steps of the largest problem, total steps / slots), where a problem's steps
  are ceil(rows / 8) greedy steps, then one step per Dijkstra iteration for the rows left.
  Padded targets are never queued: padding costs neither loop steps nor work, and a problem
  with no valid target costs nothing. Worst case a problem with n valid rows takes
  O(n min(n, Q)) Dijkstra steps, O(n min(n, Q) Q) time, as for scipy, but a step of the
  lock-step loop costs far more on the CPU than a step of scipy's C loop: a batch of large
  problems whose rows all prefer the same columns is measured several times slower than scipy
  (docs/benchmarks.md; use `method="scipy"` for such workloads on CPU). Under `jax.vmap` the
  mapped axis becomes one more batch dim (`custom_vmap`), so vmapped calls run the same
  batched solver, not a batched while loop.
* Static T > Q: problems with more than Q valid targets are solved transposed (queries as
  rows); both orientations share one [N, T, T] working array.
* Arithmetic is float32 without any pass over the whole `[N, T, Q]` array (on the CPU such a
  pass alone is measured slower than the whole solve, docs/benchmarks.md). Rows are checked as
  they are used: if a valid row holds a non-finite value or a nonzero magnitude outside
  [2^-64, 2^64] (where float32 dual arithmetic could overflow or flush to zero), the batch is
  solved a second time with every gathered row mapped through its problem's sanitization:
  scaled by a power of two to max |cost| in [0.5, 1), non-finite entries replaced as the
  `detr_jax.matcher` docstring says.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

# Valid costs with a magnitude outside [2^-64, 2^64] send the batch to the sanitized re-solve.
_SAFE_EXPONENT = 64


@custom_vmap
def assign_jax(cost, valid):
  """`assign` in JAX; cost [..., T, Q], valid [..., T] -> int32 [..., T]."""
  *lead, t, q = cost.shape
  n = int(np.prod(lead, dtype=np.int64))
  if t == 0 or q == 0 or n == 0:
    return jnp.full(valid.shape, -1, jnp.int32)
  out = _solve_batch(cost.reshape(n, t, q).astype(jnp.float32), valid.reshape(n, t))
  return out.reshape(valid.shape)


@assign_jax.def_vmap
def _assign_jax_vmap(axis_size, in_batched, cost, valid):
  """Under vmap, the mapped axis is just one more leading batch dim: no batched while loop."""
  cost_batched, valid_batched = in_batched
  if not cost_batched:
    cost = jnp.broadcast_to(cost, (axis_size,) + cost.shape)
  if not valid_batched:
    valid = jnp.broadcast_to(valid, (axis_size,) + valid.shape)
  return assign_jax(cost, valid), True


@jax.jit
def _solve_batch(cost, valid):
  """Orientation: rows = targets if n_valid <= Q, else rows = queries (transposed).

  Args:
    cost: float32 [N, T, Q].
    valid: bool [N, T].

  Returns:
    int32 [N, T] query per target, -1 unmatched.
  """
  n, t, q = cost.shape
  if t <= q:
    return _solve_rows(cost, valid, None)
  # T > Q: problems with more than Q valid targets are solved transposed. Both orientations are
  # embedded in [N, T, T] with invalid columns (padded queries, resp. invalid targets).
  flip = valid.sum(-1) > q
  ids = jnp.arange(t)
  plain = jnp.pad(cost, ((0, 0), (0, 0), (0, t - q)))
  transposed = jnp.pad(jnp.swapaxes(cost, 1, 2), ((0, 0), (0, t - q), (0, 0)))
  square = jnp.where(flip[:, None, None], transposed, plain)
  rowok = jnp.where(flip[:, None], (ids < q)[None], valid)
  colok = jnp.where(flip[:, None], valid, (ids < q)[None])
  col4row = _solve_rows(square, rowok, colok)  # [N, T]
  # Transposed problems: query q got target col4row[q]; invert.
  b = jnp.arange(n)[:, None]
  tgt = jnp.where((col4row >= 0) & (ids < q)[None], col4row, t)
  inverse = jnp.full((n, t), -1, jnp.int32).at[b, tgt].set(ids[None], mode="drop")
  return jnp.where(flip[:, None], inverse, col4row)


def _solve_rows(cost, rowok, colok):
  """Matches every valid row; needs #valid rows <= #valid columns in each problem.

  Args:
    cost: float32 [N, R, C].
    rowok: bool [N, R] rows to match.
    colok: bool [N, C] usable columns, or None for all.

  Returns:
    int32 [N, R] column per row, -1 for invalid rows.
  """
  n, r, c = cost.shape
  row_bits = _pack_bits(rowok)  # [N, ceil(R / 32)]
  n_rows = jnp.sum(lax.population_count(row_bits), axis=1).astype(jnp.int32)

  # Pass 0 solves on the raw costs. If a used row was unsafe, pass 1 solves again with every
  # gathered row mapped through the per-problem sanitization (one compiled solver loop).
  def solve(st):
    pass_, _, _ = st
    fix = lax.cond(
      pass_ > 0,
      lambda: _sanitize_params(cost, rowok, colok, n_rows),
      lambda: _identity_params(n),
    )
    row4col, bad, _ = _match(cost, row_bits, n_rows, colok, fix)
    return pass_ + 1, row4col, bad & (pass_ == 0)

  init = (jnp.int32(0), jnp.full((n, c), -1, jnp.int32), jnp.bool_(True))
  _, row4col, _ = lax.while_loop(lambda st: st[2], solve, init)
  b = jnp.arange(n)[:, None]
  col = jnp.where(row4col >= 0, row4col, r)
  return jnp.full((n, r), -1, jnp.int32).at[b, col].set(jnp.arange(c)[None], mode="drop")


def _pack_bits(mask):
  """bool [N, R] -> uint32 [N, ceil(R / 32)]; bit b of word w is mask[:, 32 w + b]."""
  n, r = mask.shape
  w = -(-r // 32)
  mask = jnp.pad(mask, ((0, 0), (0, 32 * w - r))).reshape(n, w, 32).astype(jnp.uint32)
  return jnp.sum(mask << jnp.arange(32, dtype=jnp.uint32), axis=2, dtype=jnp.uint32)


def _next_bit(bits, after):
  """Index of the first set bit above `after` in bits [S, W] (per row), 32 W if none."""
  w = bits.shape[1]
  shift = jnp.clip(after[:, None] + 1 - 32 * jnp.arange(w), 0, 32)
  keep = jnp.where(shift >= 32, 0, jnp.left_shift(jnp.uint32(0xFFFFFFFF), shift.astype(jnp.uint32)))
  x = bits & keep.astype(jnp.uint32)
  low = x & (~x + jnp.uint32(1))  # lowest set bit
  pos = 31 - lax.clz(low).astype(jnp.int32)
  return jnp.min(jnp.where(x != 0, 32 * jnp.arange(w) + pos, 32 * w), axis=1)


def _sanitize_params(cost, rowok, colok, n_rows):
  """Per-problem map that scales costs to max |cost| in [0.5, 1) and replaces non-finite ones.

  Args:
    cost: float32 [N, R, C].
    rowok: bool [N, R].
    colok: bool [N, C] or None.
    n_rows: int32 [N], number of pairs each problem matches.

  Returns:
    float32 [N, 4]: scale factors s1, s2 (powers of two; their product is the scale), the value
    of NaN/+inf and the value of -inf (`detr_jax.matcher` docstring: non-finite costs). See
    `_apply_params`.
  """
  mask = rowok[:, :, None]
  if colok is not None:
    mask = mask & colok[:, None, :]
  finite = jnp.isfinite(cost) & mask
  lo = jnp.min(jnp.where(finite, cost, jnp.inf), axis=(1, 2))
  hi = jnp.max(jnp.where(finite, cost, -jnp.inf), axis=(1, 2))
  any_finite = jnp.any(finite, axis=(1, 2))
  lo = jnp.where(any_finite, lo, 0.0)
  hi = jnp.where(any_finite, hi, 0.0)
  _, e = jnp.frexp(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
  # 2^-e in two normal-range factors (2^-e alone can be subnormal or overflow).
  e1 = -e // 2
  s1 = jnp.ldexp(jnp.ones_like(lo), e1)
  s2 = jnp.ldexp(jnp.ones_like(lo), -e - e1)
  lo, hi = lo * s1 * s2, hi * s1 * s2
  span = hi - lo
  amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  base = jnp.where(span > 0, span, jnp.where(amax > 0, amax, 1.0))
  d = (jnp.minimum(n_rows, cost.shape[2]) + 1).astype(jnp.float32) * base
  return jnp.stack([s1, s2, hi + d, lo - d], axis=1)


def _identity_params(n):
  """`_sanitize_params` that leaves finite costs unchanged: float32 [N, 4]."""
  return jnp.tile(jnp.array([1.0, 1.0, jnp.inf, -jnp.inf], jnp.float32), (n, 1))


def _apply_params(row, fix):
  """Maps rows [S, C] with their problems' `_sanitize_params` fix [S, 4]."""
  scaled = row * fix[:, 0:1] * fix[:, 1:2]
  out = jnp.where(jnp.isnan(row) | (row == jnp.inf), fix[:, 2:3], scaled)
  return jnp.where(row == -jnp.inf, fix[:, 3:4], out)


def _match(cost, row_bits, n_rows, colok, fix):
  """Greedy matching, then shortest augmenting paths for the rows it left (module docstring).

  Args:
    cost: float32 [N, R, C].
    row_bits: uint32 [N, ceil(R / 32)], the rows to match as bits (`_pack_bits`).
    n_rows: int32 [N] number of rows to match, each <= the number of usable columns.
    colok: bool [N, C] usable columns, or None for all.
    fix: float32 [N, 4], how gathered rows are mapped (`_sanitize_params`).

  Returns:
    row4col: int32 [N, C] row matched to each column, -1 for free columns.
    bad: bool [], a used row held a non-finite value or a magnitude outside the safe range.
    steps: int32 [2], trip counts of the greedy and the augmenting loop.
  """
  row4col, left_bits, bad, greedy_steps = _greedy(cost, row_bits, n_rows, colok, fix)
  n_left = jnp.sum(lax.population_count(left_bits), axis=1).astype(jnp.int32)
  row4col, augment_steps = _augment(cost, left_bits, n_left, colok, fix, row4col)
  return row4col, bad, jnp.stack([greedy_steps, augment_steps])


# Rows each greedy slot takes per step.
_GREEDY_ROWS = 8


def _greedy_slots(n):
  """Problems the greedy loop works on side by side (tuned in benchmarks/matcher.py)."""
  return int(min(n, 8 * max(1, -(-n // 64))))


def _num_slots(n):
  """Problems the augmenting loop works on side by side (tuned in benchmarks/matcher.py).

  A loop step gets dearer with S (linearly, docs/benchmarks.md) and the trip count is about
  max(steps of the largest problem, total steps / S); after the greedy phase few rows are left,
  and S ~ n / 12 balances the two for COCO-like target counts.
  """
  return int(min(n, 8 * max(1, -(-n // 96))))


def _queue(n_rows, s):
  """Problems with rows to match, most rows first, then the idle marker n; int32 [N + S + 1]."""
  n = n_rows.shape[0]
  queue = jnp.argsort(-n_rows, stable=True).astype(jnp.int32)
  queue = jnp.where(n_rows[queue] > 0, queue, n)
  return jnp.concatenate([queue, jnp.full((s + 1,), n, jnp.int32)])


def _refill(queue, qp, p, done):
  """Slots whose problem is done take the next problems from the queue: (p [S], qp [])."""
  s = p.shape[0]
  n = queue.shape[0] - s - 1
  ids = jnp.arange(s)
  rank = jnp.sum((ids[None, :] < ids[:, None]) & done[None, :], axis=1)  # done slots before
  p_next = jnp.where(done, queue[jnp.minimum(qp + rank, n + s)], p)
  return p_next, qp + jnp.sum(done)


def _greedy(cost, row_bits, n_rows, colok, fix):
  """Each row takes a free column among its minima, in row order; conflicting rows are left.

  With row duals u = row minimum and column duals v = 0, every pair taken is tight and no
  reduced cost is negative, so the result is a valid start for `_augment`. Slots take problems
  from the size-sorted queue and `_GREEDY_ROWS` valid rows of their problem per step; every
  valid row is gathered exactly once, and checked for values `_augment` could not handle.

  Args:
    cost, row_bits, n_rows, colok, fix: as for `_match`.

  Returns:
    row4col: int32 [N, C] row taken by each column, -1 for free columns.
    left_bits: uint32 [N, ceil(R / 32)] rows left for `_augment`.
    bad: bool [], a valid row held a non-finite value or a magnitude outside the safe range.
    steps: int32 [], loop trip count.
  """
  n, r, c = cost.shape
  s, g = _greedy_slots(n), _GREEDY_ROWS
  w = row_bits.shape[1]
  flat_cost = cost.reshape(n * r, c)
  col_ids = jnp.arange(c, dtype=jnp.int32)
  earlier = jnp.arange(g)[None, :] < jnp.arange(g)[:, None]  # [G, G]: row g' before row g
  queue = _queue(n_rows, s)
  init = dict(
    it=jnp.int32(0),
    qp=jnp.int32(s),  # next queue position
    p=queue[:s],  # problem of each slot, n = idle
    last=jnp.full((s,), -1, jnp.int32),  # last row taken from the problem
    row4col=jnp.full((s, c), -1, jnp.int32),
    left=jnp.zeros((s, w), jnp.uint32),
    out=jnp.full((n, c), -1, jnp.int32),
    out_left=jnp.zeros((n, w), jnp.uint32),
    chk=jnp.zeros((s, c), jnp.int32),  # max |binary exponent| of the used costs != 0
  )

  def body(st):
    p = st["p"]
    active = p < n
    pc = jnp.minimum(p, n - 1)
    bits = row_bits[pc]
    rows, last = [], st["last"]
    for _ in range(g):
      last = _next_bit(bits, last)
      rows.append(last)
    rows = jnp.stack(rows, axis=1)  # [S, G], R where the problem has no more rows
    ok = (rows < r) & active[:, None]
    index = (pc[:, None] * r + jnp.minimum(rows, r - 1)).reshape(s * g)
    raw = lax.optimization_barrier(flat_cost[index])  # [S G, C]
    row = _apply_params(raw, jnp.repeat(fix[pc], g, axis=0)).reshape(s, g, c)
    exponent = lax.bitcast_convert_type(raw, jnp.int32).reshape(s, g, c) & 0x7FFFFFFF
    seen = (exponent != 0) & ok[:, :, None]
    if colok is not None:
      usable = colok[pc][:, None, :]
      seen &= usable
      row = jnp.where(usable, row, jnp.inf)
    unsafe = jnp.where(seen, jnp.abs((exponent >> 23) - 127), 0)
    chk = jnp.maximum(st["chk"], jnp.max(unsafe, axis=1))

    # A free column among the row's minima (the lowest index), if there is one.
    okey = _order_key(row)
    tight = okey == jnp.min(okey, axis=2, keepdims=True)
    free = (st["row4col"] < 0)[:, None, :]
    best = jnp.min(jnp.where(tight, jnp.where(free, 0, c), 2 * c) + col_ids, axis=2)  # [S, G]
    j = best % c
    claim = ok & (best < c)
    clash = jnp.any(earlier[None] & claim[:, None, :] & (j[:, None, :] == j[:, :, None]), axis=2)
    take = claim & ~clash
    taken_by = jnp.max(
      jnp.where(take[:, :, None] & (col_ids == j[:, :, None]), rows[:, :, None], -1), 1
    )
    row4col = jnp.where(taken_by >= 0, taken_by, st["row4col"])
    left_rows = ok & ~take
    row_bit = jnp.left_shift(jnp.uint32(1), (rows % 32).astype(jnp.uint32))
    in_word = left_rows[:, :, None] & ((rows // 32)[:, :, None] == jnp.arange(w))
    left = st["left"] | jnp.sum(
      jnp.where(in_word, row_bit[:, :, None], jnp.uint32(0)), 1, jnp.uint32
    )

    done = active & (_next_bit(bits, last) >= r)
    slot_to = jnp.where(done, p, n)
    out = st["out"].at[slot_to].set(row4col, mode="drop")
    out_left = st["out_left"].at[slot_to].set(left, mode="drop")
    p_next, qp = _refill(queue, st["qp"], p, done)
    return dict(
      it=st["it"] + 1,
      qp=qp,
      p=p_next,
      last=jnp.where(done, -1, last),
      row4col=jnp.where(done[:, None], -1, row4col),
      left=jnp.where(done[:, None], jnp.uint32(0), left),
      out=out,
      out_left=out_left,
      chk=chk,
    )

  final = lax.while_loop(lambda st: jnp.any(st["p"] < n), body, init)
  # Exponent 128 is inf/NaN; beyond +-64 float32 duals could overflow or flush to zero.
  bad = jnp.max(final["chk"]) >= _SAFE_EXPONENT
  return final["out"], final["out_left"], bad, final["it"]


def _augment(cost, row_bits, n_rows, colok, fix, start):
  """Shortest augmenting paths for the given rows, from a greedy start (module docstring).

  Args:
    cost: float32 [N, R, C].
    row_bits: uint32 [N, ceil(R / 32)], the rows still to match as bits (`_pack_bits`).
    n_rows: int32 [N] number of rows still to match (<= the number of free usable columns).
    colok: bool [N, C] usable columns, or None for all.
    fix: float32 [N, 4], how gathered rows are mapped (`_sanitize_params`).
    start: int32 [N, C] row of each column after `_greedy`, tight with u = row minimum, v = 0.

  Returns:
    row4col: int32 [N, C] row matched to each column, -1 for free columns.
    steps: int32 [], loop trip count.
  """
  n, r, c = cost.shape
  s = _num_slots(n)
  w = -(-c // 32)  # uint32 words of a column set
  inf = jnp.float32(jnp.inf)
  col_ids = jnp.arange(c, dtype=jnp.int32)
  word_of = col_ids // 32
  bit_of = jnp.left_shift(jnp.uint32(1), (col_ids % 32).astype(jnp.uint32))
  slot_ids = jnp.arange(s)
  flat_cost = cost.reshape(n * r, c)

  queue = _queue(n_rows, s)

  def blocked_of(p):
    if colok is None:
      return jnp.zeros((p.shape[0], c), bool)
    return ~colok[jnp.minimum(p, n - 1)]

  def first_row(p):
    return _next_bit(row_bits[jnp.minimum(p, n - 1)], jnp.full(p.shape, -1, jnp.int32))

  p0 = queue[:s]
  init = dict(
    it=jnp.int32(0),
    qp=jnp.int32(s),  # next queue position
    out=start,
    p=p0,  # problem of each slot, n = idle
    root=first_row(p0),  # the free row whose path is being searched
    cur=first_row(p0),  # row being relaxed
    via=jnp.full((s,), -1, jnp.int32),  # column through which `cur` was reached, -1: root
    mv=jnp.zeros((s,), jnp.float32),  # label of the last visited column
    v=jnp.zeros((s, c), jnp.float32),
    row4col=start[jnp.minimum(p0, n - 1)],
    spc=jnp.full((s, c), inf),  # shortest reduced path cost to each column
    prow=jnp.full((s, c), -1, jnp.int32),  # row that set spc
    pcol=jnp.full((s, c), -1, jnp.int32),  # column through which prow was reached
    blocked=blocked_of(p0),  # visited or unusable columns
    anc=jnp.zeros((s, c, w), jnp.uint32),  # columns on the path to each visited column
  )
  max_steps = min(n * r * c + 1, 2**31 - 1)  # never reached: each step visits a new column

  def cond(st):
    return jnp.any(st["p"] < n) & (st["it"] < max_steps)

  def body(st):
    p, v, row4col, spc, blocked = st["p"], st["v"], st["row4col"], st["spc"], st["blocked"]
    via, cur, root = st["via"], st["cur"], st["root"]
    active = p < n
    pc = jnp.minimum(p, n - 1)
    # The barrier keeps later gathers from re-reading (and parallelizing over) the cost.
    raw = lax.optimization_barrier(flat_cost[pc * r + cur])  # [S, C]
    row = _apply_params(raw, fix[pc])

    # Relax the columns from row `cur`; u of a matched row from its tight column.
    via_c = jnp.maximum(via, 0)[:, None]
    u = jnp.where(via >= 0, (_take(row, via_c) - _take(v, via_c))[:, 0], 0.0)
    red = (st["mv"] - u)[:, None] + row - v
    upd = ~blocked & (red < spc)
    spc = jnp.where(upd, red, spc)
    prow = jnp.where(upd, cur[:, None], st["prow"])
    pcol = jnp.where(upd, via[:, None], st["pcol"])

    # Visit the cheapest unvisited column, a free one among ties. Floats are compared as
    # order-preserving int32 keys (integer min reductions are the fast ones on CPU).
    okey = _order_key(jnp.where(blocked, inf, spc))
    low_key = jnp.min(okey, axis=1)
    lowest = _from_order_key(low_key)
    tie = jnp.where(okey == low_key[:, None], jnp.where(row4col < 0, 0, c), 2 * c)
    j = jnp.min(jnp.where(blocked, 3 * c, tie + col_ids), axis=1) % c
    jc = j[:, None]
    hit = col_ids == jc
    visited = blocked | hit
    nxt = _take(row4col, jc)[:, 0]
    sink = active & (nxt < 0)

    # Columns on the path to j: the ancestors of j's predecessor column, plus j.
    pj = _take(pcol, jc)[:, 0]
    anc_p = jnp.where(pj[:, None] >= 0, st["anc"][slot_ids, jnp.maximum(pj, 0)], jnp.uint32(0))
    j_bit = jnp.left_shift(jnp.uint32(1), (j % 32).astype(jnp.uint32))
    anc_j = anc_p | jnp.where(jnp.arange(w) == (j // 32)[:, None], j_bit[:, None], jnp.uint32(0))
    anc = st["anc"].at[slot_ids, j].set(anc_j)

    # Augment where j is free: path columns take the row that relaxed them; duals of the
    # visited columns drop by (lowest - spc).
    aug = sink[:, None]
    on_path = aug & ((anc_j[:, word_of] & bit_of) != 0)
    row4col_new = jnp.where(on_path, prow, row4col)
    used = visited if colok is None else visited & ~blocked_of(p)
    v_new = jnp.where(aug & used, v - (lowest[:, None] - spc), v)

    # Next free row; slots whose problem is done write it back and take the next problem.
    next_root = _next_bit(row_bits[pc], root)
    done = sink & (next_root >= r)
    out = st["out"].at[jnp.where(done, p, n)].set(row4col_new, mode="drop")
    p_next, qp = _refill(queue, st["qp"], p, done)
    next_root = jnp.where(done, first_row(p_next), next_root)

    keep = ~active  # idle slots carry their state unchanged
    new_search = sink[:, None]
    return dict(
      it=st["it"] + 1,
      qp=qp,
      out=out,
      p=p_next,
      root=jnp.where(sink, next_root, root),
      cur=jnp.where(keep, cur, jnp.where(sink, next_root, nxt)),
      via=jnp.where(keep | sink, -1, j),
      mv=jnp.where(keep | sink, 0.0, lowest),
      v=jnp.where(done[:, None], 0.0, v_new),
      row4col=jnp.where(done[:, None], start[jnp.minimum(p_next, n - 1)], row4col_new),
      spc=jnp.where(new_search | keep[:, None], inf, spc),
      prow=prow,
      pcol=pcol,
      blocked=jnp.where(new_search, blocked_of(p_next), jnp.where(keep[:, None], blocked, visited)),
      anc=anc,
    )

  final = lax.while_loop(cond, body, init)
  return final["out"], final["it"]


def _order_key(x):
  """float32 -> int32 with the same order (NaN aside)."""
  i = lax.bitcast_convert_type(x, jnp.int32)
  return i ^ ((i >> 31) & 0x7FFFFFFF)


def _from_order_key(k):
  """Inverse of `_order_key`."""
  return lax.bitcast_convert_type(k ^ ((k >> 31) & 0x7FFFFFFF), jnp.float32)


def _take(x, idx):
  """x [S, C] gathered at idx [S, K] along the last axis."""
  return jnp.take_along_axis(x, idx, axis=1, mode="clip")
