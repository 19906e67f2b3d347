"""PyTorch's `F.interpolate` index rules, for NumPy and JAX resizes that must match torch.

The reference upsamples mask logits with `mode="bilinear", align_corners=False` (no
antialiasing, unlike `jax.image.resize`) and resizes segment maps with `mode="nearest"`.
These give the source pixels and weights along one axis; the callers gather and blend.
"""

import numpy as np


def nearest_index(n_in, n_out):
  """torch "nearest": the source index of each of `n_out` outputs, floor(i * (n_in / n_out))
  in float32, clamped: int64 [n_out]."""
  scale = np.float32(n_in) / np.float32(n_out)
  idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, n_in - 1)


def bilinear_taps(n_in, n_out):
  """torch "bilinear" (align_corners=False) along one axis: (i0, i1, w0, w1), each [n_out],
  output i = w0 * x[i0] + w1 * x[i1].

  The source position is max(scale * (i + 0.5) - 0.5, 0), scale = n_in / n_out in float32;
  torch computes it with one fused multiply-add (exact in float64, then rounded once to
  float32), so the weights are exactly torch's.
  """
  scale = np.float32(n_in) / np.float32(n_out)
  src = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, 0)
  i0 = np.minimum(src.astype(np.int64), n_in - 1)  # floor, src >= 0
  w1 = np.minimum(src - i0.astype(np.float32), 1).astype(np.float32)
  return i0, np.minimum(i0 + 1, n_in - 1), np.float32(1) - w1, w1
