"""DETR's transformer encoder and decoder, written from scratch in Flax linen.

Layer order, position handling and LayerNorm epsilon follow the reference exactly:
positions are added to queries and keys (never values) at every layer, the decoder starts
from zeros with the learned query embedding as its query position, and one shared final
LayerNorm normalizes every decoder layer's output. Post-norm by default, pre-norm optional.

Parameter names follow the reference state dict (`self_attn`, `multihead_attn`, `linear1`,
`linear2`, `norm1..3`) so that weight import is a rename.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax import conv

LN_EPS = 1e-5

# Reference init: xavier-uniform on every matrix, q/k/v packed as one [3d, d] matrix.
_xavier = nn.initializers.xavier_uniform()
_xavier_packed_qkv = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


def _torch_bias_init(fan_in):
  """PyTorch's default Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _hash32(x):
  """A bijective 32-bit integer hash with good avalanche ("lowbias32", C. Wellons). uint32."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def dropout_bits(key, shape):
  """Uniform random uint32 words of `shape`: a keyed hash of each element's global index.

  Two rounds of `_hash32` keyed by 64 bits drawn from `key` (one threefry call per array
  instead of one per element: 4x cheaper than `jax.random.bits` on CPU). The words are a pure
  function of (key, index), so they do not depend on how the array is sharded.
  """
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return _hash32(_hash32(index ^ seed[0]) + seed[1])


class Dropout(nn.Module):
  """Inverted dropout with cheap keep decisions, 16 random bits per element.

  Same semantics as `nn.Dropout` (zero with probability `rate`, scale the kept values so the
  expectation is unchanged) with the rate rounded to a multiple of 1/65536 (0.1 becomes
  0.100006). The bits come from `dropout_bits`: two elements share one hashed 32-bit word.
  DETR drops ~21M elements per DETR-R50 step at 512 x 512; with `jax.random.bits` that was the
  transformer's largest cost after its matmuls on CPU. Uses the `dropout` rng. x: any shape.
  """

  rate: float

  @nn.compact
  def __call__(self, x, deterministic):
    keep = round((1.0 - self.rate) * 65536)
    if deterministic or keep >= 65536:
      return x
    if keep <= 0:
      return jnp.zeros_like(x)
    # Pairs along the last axis share a word; leading axes (batch) keep their sharding.
    *lead, last = x.shape
    words = dropout_bits(self.make_rng("dropout"), (*lead, (last + 1) // 2))
    bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, -1)[..., :last]
    scale = jnp.asarray(65536.0 / keep, x.dtype)
    return jnp.where(bits < keep, x * scale, jnp.zeros((), x.dtype))


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_implementation(requested, dtype, backend=None):
  """The attention kernel for `requested`: "auto" picks cuDNN's flash attention on GPU for
  16-bit compute (cuDNN has no float32 kernel) and the einsum softmax everywhere else."""
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"Unknown attention implementation {requested!r}; choose from {ATTENTION_IMPLEMENTATIONS}"
    )
  if requested != "auto":
    return requested
  backend = backend or jax.default_backend()
  sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if backend == "gpu" and sixteen_bit else "xla"


def multi_head_attention(module, q, k, v, dropout, implementation, dtype, deterministic):
  """Softmax attention of projected heads, called inside `module`'s compact method.

  q [B, Lq, H, dq], k [B, Lk, H, dq], v [B, Lk, H, dv] -> [B, Lq, H, dv]; logits scaled by
  dq ** -0.5. The head-averaged probabilities are sown into `module`'s `intermediates` as
  `attention_weights` [B, Lq, Lk]; `dropout` drops probabilities when not `deterministic`.
  `implementation` as `attention_implementation`; cuDNN needs dq == dv (else the einsum path).
  """
  implementation = attention_implementation(implementation, dtype)
  cudnn_ok = q.shape[-1] == v.shape[-1] and (deterministic or dropout == 0.0)
  if implementation == "cudnn" and cudnn_ok:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  module.sow("intermediates", "attention_weights", probs.mean(axis=1))
  if not deterministic and dropout > 0:
    probs = Dropout(dropout)(probs, deterministic=False)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v)


def split_groups(x, groups):
  """[B, G * Q, ...] -> [B * G, Q, ...]: each group of queries becomes its own batch row."""
  return x.reshape(x.shape[0] * groups, x.shape[1] // groups, *x.shape[2:])


def merge_groups(x, groups):
  """Inverse of `split_groups`: [B * G, Q, ...] -> [B, G * Q, ...]."""
  return x.reshape(x.shape[0] // groups, x.shape[1] * groups, *x.shape[2:])


def grouped_self_attention(attn, groups):
  """`attn(q, k, v, deterministic)` over [B, G * Q, ...] inputs with each of the G query groups
  attending only to itself (Group DETR); `attn` itself when G == 1."""
  if groups == 1:
    return attn

  def grouped(q, k, v, deterministic):
    q, k, v = (split_groups(x, groups) for x in (q, k, v))
    return merge_groups(attn(q, k, v, deterministic), groups)

  return grouped


def dense(features, kernel_init, bias_init, conv_impl, dtype, name):
  """The transformer's linear layer: float32 parameters, `dtype` compute, and the
  `dot_general` of `config.model.conv` (`conv.dot_general_for`)."""
  return nn.Dense(
    features,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    dot_general=conv.dot_general_for(conv_impl),
    name=name,
  )


def out_projection(x, conv_impl, dtype):
  """`out_proj` of an attention module: merges the heads of x [..., H, dv] and projects them
  (xavier-uniform matrix, zero bias) -> [..., H * dv]."""
  x = x.reshape(*x.shape[:-2], -1)
  return dense(x.shape[-1], _xavier, nn.initializers.zeros, conv_impl, dtype, "out_proj")(x)


class Attention(nn.Module):
  """Multi-head attention with separate q/k/v inputs, like torch's nn.MultiheadAttention.

  Attention probabilities (averaged over heads) are sown into the `intermediates`
  collection as `attention_weights` [B, Lq, Lk] for visualization.

  Attributes:
    num_heads: heads; d_model must be divisible by it.
    dropout: dropout rate on the attention probabilities.
    implementation: "xla" (explicit einsum softmax, supports dropout), "cudnn"
      (`jax.nn.dot_product_attention` flash kernel; no attention-probability dropout, so
      training with dropout falls back to "xla"), or "auto" (see `attention_implementation`).
    conv: `config.model.conv`; picks the projections' `dot_general` (`conv.dot_general_for`).
  """

  num_heads: int
  dropout: float
  implementation: str
  conv: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, query, key, value, deterministic):
    """query [B, Lq, D], key [B, Lk, D], value [B, Lk, D] -> [B, Lq, D]."""
    d = query.shape[-1]
    head_dim = d // self.num_heads

    def proj(x, name, kernel_init):
      y = dense(d, kernel_init, nn.initializers.zeros, self.conv, self.dtype, name)(x)
      return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

    q = proj(query, "q_proj", _xavier_packed_qkv)
    k = proj(key, "k_proj", _xavier_packed_qkv)
    v = proj(value, "v_proj", _xavier_packed_qkv)
    out = multi_head_attention(
      self, q, k, v, self.dropout, self.implementation, self.dtype, deterministic
    )
    return out_projection(out, self.conv, self.dtype)


class FeedForward(nn.Module):
  """linear1 -> ReLU -> dropout -> linear2: [..., D] -> [..., D]."""

  dim_feedforward: int
  dropout: float
  conv: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, deterministic):
    d = x.shape[-1]
    linear = lambda n, fan_in, name: dense(
      n, _xavier, _torch_bias_init(fan_in), self.conv, self.dtype, name
    )
    y = nn.relu(linear(self.dim_feedforward, d, "linear1")(x))
    y = Dropout(self.dropout)(y, deterministic=deterministic)
    return linear(d, self.dim_feedforward, "linear2")(y)


class EncoderLayer(nn.Module):
  """Self-attention (q = k = x + pos, v = x) then FFN, each with residual and LayerNorm."""

  num_heads: int
  dim_feedforward: int
  dropout: float
  pre_norm: bool
  attention: str
  conv: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, pos, deterministic):
    """x: [B, N, D] tokens, pos: [N, D] position embedding -> [B, N, D]."""
    attn = Attention(
      self.num_heads, self.dropout, self.attention, self.conv, self.dtype, name="self_attn"
    )
    ffn = FeedForward(self.dim_feedforward, self.dropout, self.conv, self.dtype, name="linear")
    drop = lambda y: Dropout(self.dropout)(y, deterministic=deterministic)
    norm1 = _layer_norm(self.dtype, "norm1")
    norm2 = _layer_norm(self.dtype, "norm2")
    if self.pre_norm:
      y = norm1(x)
      x = x + drop(attn(y + pos, y + pos, y, deterministic))
      return x + drop(ffn(norm2(x), deterministic))
    x = norm1(x + drop(attn(x + pos, x + pos, x, deterministic)))
    return norm2(x + drop(ffn(x, deterministic)))


class DecoderLayer(nn.Module):
  """Self-attention over queries, cross-attention to memory, FFN; positions re-added each layer."""

  num_heads: int
  dim_feedforward: int
  dropout: float
  pre_norm: bool
  attention: str
  conv: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, t, memory, pos, query_pos, deterministic, groups):
    """t: [B, Q, D], memory: [B, N, D], pos: [N, D], query_pos: [Q, D] -> [B, Q, D].

    groups: G > 1 splits the Q queries into G consecutive groups of Q / G that do not see
    each other in self-attention (Group DETR); 1 is DETR's self-attention over all queries.
    """
    mk_attn = lambda name: Attention(
      self.num_heads, self.dropout, self.attention, self.conv, self.dtype, name=name
    )
    self_attn = grouped_self_attention(mk_attn("self_attn"), groups)
    cross_attn = mk_attn("multihead_attn")
    ffn = FeedForward(self.dim_feedforward, self.dropout, self.conv, self.dtype, name="linear")
    drop = lambda y: Dropout(self.dropout)(y, deterministic=deterministic)
    norm1, norm2, norm3 = (_layer_norm(self.dtype, f"norm{i}") for i in (1, 2, 3))
    k_mem = memory + pos
    if self.pre_norm:
      y = norm1(t)
      t = t + drop(self_attn(y + query_pos, y + query_pos, y, deterministic))
      y = norm2(t)
      t = t + drop(cross_attn(y + query_pos, k_mem, memory, deterministic))
      return t + drop(ffn(norm3(t), deterministic))
    t = norm1(t + drop(self_attn(t + query_pos, t + query_pos, t, deterministic)))
    t = norm2(t + drop(cross_attn(t + query_pos, k_mem, memory, deterministic)))
    return norm3(t + drop(ffn(t, deterministic)))


class Transformer(nn.Module):
  """Encoder over image tokens, decoder over object queries.

  Returns the output of every decoder layer after the shared final LayerNorm, and with
  `return_memory` also the encoder's output (the memory the decoder attends to).
  """

  num_heads: int
  num_encoder_layers: int
  num_decoder_layers: int
  dim_feedforward: int
  dropout: float
  pre_norm: bool
  attention: str
  conv: str
  remat: bool
  dtype: jnp.dtype
  return_memory: bool = False

  @nn.compact
  def __call__(self, src, pos, query_embed, deterministic, groups):
    """src: [B, N, D] projected features, pos: [N, D], query_embed: [Q, D] -> [L, B, Q, D]
    (with `return_memory`: that and the memory [B, N, D]).

    groups: query groups of the decoder self-attention (`DecoderLayer`); Q divisible by it.
    """
    kw = dict(
      num_heads=self.num_heads,
      dim_feedforward=self.dim_feedforward,
      dropout=self.dropout,
      pre_norm=self.pre_norm,
      attention=self.attention,
      conv=self.conv,
      dtype=self.dtype,
    )
    enc_cls, dec_cls = EncoderLayer, DecoderLayer
    if self.remat:
      enc_cls = nn.remat(EncoderLayer, static_argnums=(3,))
      dec_cls = nn.remat(DecoderLayer, static_argnums=(5, 6))
    pos = pos.astype(self.dtype)
    query_pos = query_embed.astype(self.dtype)
    x = src.astype(self.dtype)
    for i in range(self.num_encoder_layers):
      x = enc_cls(**kw, name=f"encoder_layer{i}")(x, pos, deterministic)
    if self.pre_norm:
      x = _layer_norm(self.dtype, "encoder_norm")(x)
    memory = x
    t = jnp.zeros((src.shape[0],) + query_embed.shape, self.dtype)
    decoder_norm = _layer_norm(self.dtype, "decoder_norm")
    outputs = []
    for i in range(self.num_decoder_layers):
      t = dec_cls(**kw, name=f"decoder_layer{i}")(t, memory, pos, query_pos, deterministic, groups)
      outputs.append(decoder_norm(t))
    if self.return_memory:
      return jnp.stack(outputs), memory
    return jnp.stack(outputs)
