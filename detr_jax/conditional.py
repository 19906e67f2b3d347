"""Conditional DETR's transformer (Meng et al., ICCV 2021, arXiv 2108.06152), in Flax linen.

The encoder is DETR's (`transformer.EncoderLayer`, post-norm). The decoder keeps DETR's
layer order (self-attention, cross-attention, FFN, each followed by dropout, residual and
LayerNorm; one shared final LayerNorm on every layer's output) and changes where positions
enter, as the original release does:

- Reference points: `s = sigmoid(ref_point_head(query_pos))` [Q, 2], one (x, y) per query
  from its learned embedding (an MLP D -> D -> 2), shared by all decoder layers.
- Spatial query: the sine embedding of `s` (D / 2 features per coordinate, y first, like
  `position.sine_position_embedding`), multiplied elementwise by `query_scale(t)` (an MLP
  D -> D -> D of the layer's input content t; 1 for the first layer).
- Self-attention: separate linear projections of content and position,
  q = sa_qcontent_proj(t) + sa_qpos_proj(query_pos), k likewise, v = sa_v_proj(t), and a
  multi-head attention without input projections (only `out_proj`).
- Cross-attention: per head, the query is [content_h, spatial_h] and the key is
  [memory_content_h, memory_position_h] (concatenated, 2 D / H per head, logits scaled by
  (2 D / H) ** -0.5); values are `ca_v_proj(memory)`, D / H per head. Only the first layer
  also adds `ca_qpos_proj(query_pos)` to the query content and the key position to the key
  content.
- Boxes (in `models.DETR`): the box MLP predicts offsets; the centre is
  sigmoid(offset_xy + inverse_sigmoid(s)), width and height sigmoid(offset_wh).

Post-norm only (the original raises for pre-norm). Parameter names follow the original
release's state dict (`sa_qcontent_proj`, ..., `ca_qpos_sine_proj`, `self_attn.out_proj`,
`cross_attn.out_proj`, `linear1/2`, `norm1..3`, `query_scale`, `ref_point_head`) so that weight
import is a rename (`detr_jax/convert.py`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import transformer

# Inverse sigmoid clamp of the original release and of transformers.
INVERSE_SIGMOID_EPS = 1e-5


def inverse_sigmoid(x):
  """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= 1e-5 (the original's)."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, INVERSE_SIGMOID_EPS) / jnp.maximum(1.0 - x, INVERSE_SIGMOID_EPS))


def sine_embedding(points, num_feats, temperature=10000.0):
  """Sine embedding of normalized points, as Conditional DETR embeds its reference points.

  Each coordinate c in [0, 1] becomes `num_feats` features `c * 2 pi / temperature **
  (2 * (i // 2) / num_feats)`, sin at even i and cos at odd i (interleaved); the y features
  come first, then x.

  Args:
    points: [..., 2] (x, y). num_feats: features per coordinate (D / 2).

  Returns:
    [..., 2 * num_feats] float32.
  """
  dim_t = np.arange(num_feats, dtype=np.float32)
  dim_t = np.float32(temperature) ** (np.float32(2) * (dim_t // 2) / np.float32(num_feats))
  scale = np.float32(2 * np.pi)

  def embed(c):  # [...] -> [..., num_feats]
    p = (c * scale)[..., None] / dim_t
    return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(
      *c.shape, num_feats
    )

  points = points.astype(jnp.float32)
  return jnp.concatenate([embed(points[..., 1]), embed(points[..., 0])], axis=-1)


def _dense(features, fan_in, conv_name, dtype, name):
  """A linear layer initialized like the original (xavier-uniform matrix, torch's bias)."""
  init = transformer._torch_bias_init(fan_in)
  return transformer.dense(features, transformer._xavier, init, conv_name, dtype, name)


class MLP(nn.Module):
  """Linear layers with ReLU between: [..., D_in] -> [..., features[-1]] (`layers_i`)."""

  features: tuple
  conv: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    for i, n in enumerate(self.features):
      x = _dense(n, x.shape[-1], self.conv, self.dtype, f"layers_{i}")(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


class ProjectedAttention(nn.Module):
  """Multi-head attention of already projected heads, then `out_proj`.

  The original's attention module without input projections: q [B, Lq, H, dq],
  k [B, Lk, H, dq], v [B, Lk, H, dv] -> [B, Lq, H * dv]. Sows `attention_weights`.
  """

  dropout: float
  implementation: str
  conv: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, q, k, v, deterministic):
    out = transformer.multi_head_attention(
      self, q, k, v, self.dropout, self.implementation, self.dtype, deterministic
    )
    return transformer.out_projection(out, self.conv, self.dtype)


class ConditionalDecoderLayer(nn.Module):
  """Conditional DETR decoder layer (post-norm); see the module docstring."""

  num_heads: int
  dim_feedforward: int
  dropout: float
  attention: str
  conv: str
  dtype: jnp.dtype
  is_first: bool

  @nn.compact
  def __call__(self, t, memory, pos, query_pos, query_sine, deterministic, groups):
    """One layer.

    Args:
      t: [B, Q, D] content; memory: [B, N, D]; pos: [N, D] image position embedding;
      query_pos: [Q, D] query embeddings; query_sine: [B, Q, D] spatial query (scaled sine
      embedding of the reference points); groups: query groups of the self-attention
      (Group DETR; 1 = all queries together).

    Returns:
      [B, Q, D].
    """
    b, q_len, d = t.shape
    h = self.num_heads
    heads = lambda x: x.reshape(*x.shape[:-1], h, d // h)
    dense = lambda name: _dense(d, d, self.conv, self.dtype, name)
    drop = lambda y: transformer.Dropout(self.dropout)(y, deterministic=deterministic)
    attn = lambda name: ProjectedAttention(
      self.dropout, self.attention, self.conv, self.dtype, name=name
    )
    norm1, norm2, norm3 = (transformer._layer_norm(self.dtype, f"norm{i}") for i in (1, 2, 3))

    # Self-attention: content and position projected separately, then added.
    q = dense("sa_qcontent_proj")(t) + dense("sa_qpos_proj")(query_pos)
    k = dense("sa_kcontent_proj")(t) + dense("sa_kpos_proj")(query_pos)
    v = dense("sa_v_proj")(t)
    self_attn = transformer.grouped_self_attention(attn("self_attn"), groups)
    t = norm1(t + drop(self_attn(heads(q), heads(k), heads(v), deterministic)))

    # Cross-attention: [content, position] per head for queries and keys.
    q = dense("ca_qcontent_proj")(t)
    k = dense("ca_kcontent_proj")(memory)
    v = dense("ca_v_proj")(memory)
    k_pos = dense("ca_kpos_proj")(pos)  # [N, D]
    if self.is_first:
      q = q + dense("ca_qpos_proj")(query_pos)
      k = k + k_pos
    sine = dense("ca_qpos_sine_proj")(query_sine)
    q = jnp.concatenate([heads(q), heads(sine)], axis=-1)  # [B, Q, H, 2 D / H]
    k_pos = jnp.broadcast_to(heads(k_pos), (b, *k_pos.shape[:-1], h, d // h))
    k = jnp.concatenate([heads(k), k_pos], axis=-1)  # [B, N, H, 2 D / H]
    t = norm2(t + drop(attn("cross_attn")(q, k, heads(v), deterministic)))

    ffn = transformer.FeedForward(
      self.dim_feedforward, self.dropout, self.conv, self.dtype, name="linear"
    )
    return norm3(t + drop(ffn(t, deterministic)))


class ConditionalTransformer(nn.Module):
  """DETR's encoder and Conditional DETR's decoder (post-norm).

  Attributes as `transformer.Transformer` (no pre-norm).
  """

  num_heads: int
  num_encoder_layers: int
  num_decoder_layers: int
  dim_feedforward: int
  dropout: float
  attention: str
  conv: str
  remat: bool
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, src, pos, query_embed, deterministic, groups):
    """Encoder and decoder.

    Args:
      src: [B, N, D] projected features; pos: [N, D]; query_embed: [Q, D];
      groups: query groups of the decoder self-attention (Q divisible by it).

    Returns:
      (hs [L, B, Q, D] every decoder layer's output after the shared final LayerNorm,
      reference [Q, 2] the reference points (x, y) in [0, 1]).
    """
    enc_cls, dec_cls = transformer.EncoderLayer, ConditionalDecoderLayer
    if self.remat:
      enc_cls = nn.remat(enc_cls, static_argnums=(3,))
      dec_cls = nn.remat(dec_cls, static_argnums=(6, 7))
    d = src.shape[-1]
    pos = pos.astype(self.dtype)
    query_pos = query_embed.astype(self.dtype)
    x = src.astype(self.dtype)
    for i in range(self.num_encoder_layers):
      x = enc_cls(
        self.num_heads,
        self.dim_feedforward,
        self.dropout,
        False,
        self.attention,
        self.conv,
        self.dtype,
        name=f"encoder_layer{i}",
      )(x, pos, deterministic)
    memory = x

    mlp = lambda features, name: MLP(features, self.conv, self.dtype, name=name)
    reference = jax.nn.sigmoid(mlp((d, 2), "ref_point_head")(query_pos).astype(jnp.float32))
    sine = sine_embedding(reference, d // 2).astype(self.dtype)  # [Q, D]
    query_scale = mlp((d, d), "query_scale")
    decoder_norm = transformer._layer_norm(self.dtype, "decoder_norm")
    t = jnp.zeros((src.shape[0],) + query_embed.shape, self.dtype)
    outputs = []
    for i in range(self.num_decoder_layers):
      query_sine = sine * (1.0 if i == 0 else query_scale(t))
      query_sine = jnp.broadcast_to(query_sine, t.shape)
      layer = dec_cls(
        self.num_heads,
        self.dim_feedforward,
        self.dropout,
        self.attention,
        self.conv,
        self.dtype,
        i == 0,
        name=f"decoder_layer{i}",
      )
      t = layer(t, memory, pos, query_pos, query_sine, deterministic, groups)
      outputs.append(decoder_norm(t))
    return jnp.stack(outputs), reference
