"""Sine position embedding of DETR for a fixed, unpadded feature grid."""

import math

import numpy as np


def sine_position_embedding(height, width, num_pos_feats=128, temperature=10000.0):
  """The reference DETR's normalized sine embedding of an unpadded [height, width] grid.

  Positions count from 1, are divided by the last position plus 1e-6 and scaled by 2*pi;
  feature i of an axis uses frequency `temperature ** (2 * (i // 2) / num_pos_feats)`, with
  sin and cos interleaved (`sin f0, cos f0, sin f1, ...`). Channels [0, num_pos_feats) embed
  y, [num_pos_feats, 2 * num_pos_feats) embed x. With a fixed resolution and no padding this
  is a constant, computed once in NumPy (float32, in the reference's order of operations).

  Returns:
    [height * width, 2 * num_pos_feats] float32, rows in row-major (y, x) order.
  """
  scale = np.float32(2 * math.pi)
  eps = np.float32(1e-6)
  y_embed = np.arange(1, height + 1, dtype=np.float32)
  x_embed = np.arange(1, width + 1, dtype=np.float32)
  y_embed = y_embed / (y_embed[-1] + eps) * scale
  x_embed = x_embed / (x_embed[-1] + eps) * scale
  dim_t = np.arange(num_pos_feats, dtype=np.float32)
  dim_t = np.float32(temperature) ** (np.float32(2) * (dim_t // 2) / np.float32(num_pos_feats))

  def embed(v):  # [n] -> [n, num_pos_feats]
    p = v[:, None] / dim_t
    return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], axis=2).reshape(len(v), -1)

  pos_y = np.broadcast_to(embed(y_embed)[:, None, :], (height, width, num_pos_feats))
  pos_x = np.broadcast_to(embed(x_embed)[None, :, :], (height, width, num_pos_feats))
  pos = np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)
  return pos.reshape(height * width, 2 * num_pos_feats)
