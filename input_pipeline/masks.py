"""Instance masks: COCO segmentations to RLE, masks from panoptic PNGs, exact resampling.

Where masks come from (each source's records carry `masks` uint8 `[n, h, w]`, 1 inside object
k, at the image's full resolution, when `data.masks` is on):
  * COCO "instances" segmentations (polygons, uncompressed or compressed RLE) are validated and
    converted once, when the annotations are loaded, to compressed RLE (`segmentation_to_rle`,
    pycocotools); `RleDecoder` decodes an image's RLEs in NumPy each time it is read.
  * Panoptic PNGs: object k is the set of pixels whose id (R + 256 G + 256^2 B) equals its
    segment id (`segment_masks`, TensorFlow).

Geometry. The pipeline flips and crops masks exactly (array slicing) and resamples them once,
from the source pixels of the crop window straight to their place in the output, by
`resample`: each output mask pixel is 1 when at least half of its footprint (its square of
`mask_stride` x `mask_stride` output pixels, mapped back to source pixels) lies inside the
object. The fraction inside is computed exactly (the overlap lengths of output and source
pixels along each axis as sparse matrices, applied to the rows and the columns of each
object's bounding box: the work is the boxes' area, not the image's), so a mask at stride s is
the area average of the full-resolution mask over s x s blocks thresholded at 0.5 whatever the
scale between source and output. Masks of a mosaic map each part's source pixels
to the final output through the mosaic's crop in one step (the image itself is resampled
twice there; the masks follow the same geometry as the boxes).
"""

import math

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_utils

# An output pixel is inside when its covered fraction is >= 1/2; the tolerance absorbs float
# rounding of exact halves.
_HALF = 0.5 - 1e-6


# ---------------------------------------------------------------------------------------------
# COCO segmentations (NumPy, at load time).
# ---------------------------------------------------------------------------------------------
def segmentation_to_rle(segmentation, height, width):
  """Validates a COCO `segmentation` and converts it to compressed RLE.

  Args:
    segmentation: polygons (a list of [x0, y0, x1, y1, ...] lists), an uncompressed RLE
      ({'size': [h, w], 'counts': [ints]}) or a compressed RLE ({'size', 'counts': str}).
    height, width: the image's size.

  Returns:
    (counts bytes of the compressed RLE, number of degenerate polygon parts dropped, None) or
    (None, 0, why the segmentation is unusable). Unusable: missing or empty, not one of the
    forms above, every polygon degenerate (fewer than 3 points, an odd or non-numeric
    coordinate list), RLE size different from the image's, RLE counts negative or not
    summing to height * width, or no pixel inside the image.
  """
  if isinstance(segmentation, list):
    polygons = [p for p in segmentation if _valid_polygon(p)]
    dropped = len(segmentation) - len(polygons)
    if not polygons:
      what = "no polygon" if not segmentation else "only degenerate polygons"
      return None, 0, f"{what} (a polygon needs 3 points or more)"
    rle = mask_utils.merge(
      mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    )
  elif isinstance(segmentation, dict):
    counts, why = _rle_counts(segmentation, height, width)
    if counts is None:
      return None, 0, why
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    dropped = 0
  else:
    return None, 0, f"segmentation is neither polygons nor RLE: {_short(segmentation)}"
  if int(mask_utils.area(rle)) == 0:
    return None, 0, "the mask has no pixel inside the image"
  return rle["counts"], dropped, None


def _valid_polygon(polygon):
  if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
    return False
  return all(
    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in polygon
  )


def _rle_counts(rle, height, width):
  """(uncompressed counts list, None) of a valid RLE dict of a height x width image, or
  (None, why)."""
  size = rle.get("size")
  if not isinstance(size, (list, tuple)) or [*size] != [height, width]:
    return None, f"RLE size {_short(size)} differs from the image's [{height}, {width}]"
  counts = rle.get("counts")
  if isinstance(counts, bytes):
    counts = counts.decode("ascii", errors="replace")
  if isinstance(counts, str):
    counts = _decode_counts_string(counts)
    if counts is None:
      return None, "RLE counts string is malformed"
  if not isinstance(counts, list) or not all(
    isinstance(c, int) and not isinstance(c, bool) for c in counts
  ):
    return None, f"RLE counts are not a list of integers: {_short(counts)}"
  if any(c < 0 for c in counts) or sum(counts) != height * width:
    return None, f"RLE counts are negative or do not sum to {height} x {width}"
  return counts, None


def _decode_counts_string(text):
  """The run lengths of a compressed RLE counts string (COCO's format: each count in 5-bit
  groups as chars from 48, 0x20 = more groups follow, the last group's 0x10 its sign, counts
  after the second stored as differences to the one two before), or None if malformed."""
  counts, pos = [], 0
  while pos < len(text):
    value, shift, more = 0, 0, True
    while more:
      if pos >= len(text):
        return None
      c = ord(text[pos]) - 48
      if not 0 <= c < 64:
        return None
      value |= (c & 0x1F) << shift
      more = bool(c & 0x20)
      pos += 1
      shift += 5
      if not more and c & 0x10:
        value |= -1 << shift
    if len(counts) > 2:
      value += counts[-2]
    counts.append(value)
  return counts


def _short(value, limit=60):
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def rle_json(counts, height, width):
  """A COCO `segmentation` entry (compressed RLE, counts as str) for json and pycocotools."""
  return {"size": [int(height), int(width)], "counts": counts.decode("ascii")}


def area(counts, height, width):
  """Pixels inside a compressed RLE mask."""
  return int(mask_utils.area({"size": [height, width], "counts": counts}))


def encode(mask):
  """bool/uint8 `[h, w]` -> compressed RLE counts bytes (pycocotools)."""
  return mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))["counts"]


class RleDecoder:
  """Decodes the masks of one image of an in-memory table (for `tf.numpy_function`).

  Args:
    rles: object `[M]` of compressed RLE counts bytes (b"": an all-zero mask).
    row_splits: int64 `[N + 1]`, the objects of image i are rows row_splits[i]:row_splits[i+1].
    sizes: int `[N, 2]` (height, width).
  """

  def __init__(self, rles, row_splits, sizes):
    self._rles = rles
    self._row_splits = np.asarray(row_splits, np.int64)
    self._sizes = np.asarray(sizes, np.int64).reshape(-1, 2)

  def __call__(self, index):
    """uint8 `[n, h, w]`, the masks of image `index`."""
    i = int(index)
    start, end = self._row_splits[i], self._row_splits[i + 1]
    h, w = (int(v) for v in self._sizes[i])
    out = np.zeros((end - start, h, w), np.uint8)
    for k, counts in enumerate(self._rles[start:end]):
      if counts:
        out[k] = mask_utils.decode({"size": [h, w], "counts": counts})
    return out

  def tf_decode(self, index):
    """The TensorFlow op: int64 scalar `index` -> uint8 `[n, h, w]`."""
    masks = tf.numpy_function(self, [index], tf.uint8, stateful=False)
    return tf.ensure_shape(masks, [None, None, None])


# ---------------------------------------------------------------------------------------------
# TensorFlow ops (in the tf.data pipeline).
# ---------------------------------------------------------------------------------------------
def decode_segment_ids(png_bytes):
  """A panoptic PNG -> int32 `[h, w]` segment ids (R + 256 G + 256^2 B)."""
  rgb = tf.cast(tf.io.decode_png(png_bytes, channels=3), tf.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def segment_masks(png_bytes, segment_ids):
  """Masks of panoptic segments.

  Args:
    png_bytes: tf.string scalar, a panoptic PNG.
    segment_ids: int `[n]`, the segment id of each object.

  Returns:
    uint8 `[n, h, w]`: 1 where the PNG's id equals the object's segment id.
  """
  ids = decode_segment_ids(png_bytes)
  segment_ids = tf.cast(segment_ids, tf.int32)
  return tf.cast(tf.equal(ids[None], segment_ids[:, None, None]), tf.uint8)


def edges(num_out, stride, window_start, window_len, out_len, part_start, part_len, src_len):
  """Source coordinates of the edges of output mask pixels along one axis.

  Output mask pixel i spans output pixels [i * stride, (i + 1) * stride). The output is the
  window [window_start, window_start + window_len) of a canvas resized to `out_len` pixels;
  the source occupies [part_start, part_start + part_len) of that canvas, resized from
  `src_len` source pixels. A single image: window = part = the whole output (0, out_len).

  Returns:
    float64 `[num_out + 1]`, increasing, in source pixels (outside [0, src_len]: not source).
  """
  f = lambda v: tf.cast(v, tf.float64)
  pos = f(window_start) + f(tf.range(num_out + 1) * stride) * (f(window_len) / f(out_len))
  return (pos - f(part_start)) * (f(src_len) / f(part_len))


def resample(masks, y_edges, x_edges):
  """Area-averages binary masks over output pixels and thresholds at 1/2.

  Args:
    masks: uint8 `[n, h, w]`, 0 or 1.
    y_edges: float64 `[Hm + 1]` increasing, the output pixels' row edges in source pixels;
      x_edges: float64 `[Wm + 1]` the column edges (static lengths, as `edges` makes them).
      Parts outside the source count as 0.

  Returns:
    uint8 `[n, Hm, Wm]`: 1 where at least half of the pixel's footprint is inside the mask.
  """
  hm, wm = y_edges.shape[0] - 1, x_edges.shape[0] - 1
  # Each object is resampled within its bounding box only (the work is the box's area, not
  # the image's), into the output pixels that the box touches.
  rows = tf.reduce_any(masks > 0, axis=2)  # [n, h]
  cols = tf.reduce_any(masks > 0, axis=1)  # [n, w]
  r0, r1 = _extent(rows)
  c0, c1 = _extent(cols)

  def one(k):
    i0, i1 = _touched(y_edges, r0[k], r1[k])
    j0, j1 = _touched(x_edges, c0[k], c1[k])
    block = _resample_block(
      masks[k, r0[k] : r1[k], c0[k] : c1[k]],
      y_edges[i0 : i1 + 1] - tf.cast(r0[k], tf.float64),
      x_edges[j0 : j1 + 1] - tf.cast(c0[k], tf.float64),
    )
    return tf.pad(block, [[i0, hm - i1], [j0, wm - j1]])

  return tf.map_fn(
    lambda k: tf.ensure_shape(one(k), [hm, wm]),
    tf.range(tf.shape(masks)[0]),
    fn_output_signature=tf.TensorSpec([hm, wm], tf.uint8),
  )


def _extent(any_along):
  """[n, size] bool -> (first, one past the last) index of True per row (0, 0 if none)."""
  size = tf.shape(any_along)[1]
  first = tf.argmax(tf.cast(any_along, tf.int32), axis=1, output_type=tf.int32)
  last = size - tf.argmax(tf.cast(any_along[:, ::-1], tf.int32), axis=1, output_type=tf.int32)
  none = ~tf.reduce_any(any_along, axis=1)
  return tf.where(none, 0, first), tf.where(none, 0, last)


def _touched(edges, start, stop):
  """The output pixels [i0, i1) whose [edges[i], edges[i + 1]) meet [start, stop)."""
  num_out = tf.shape(edges)[0] - 1
  start, stop = tf.cast(start, tf.float64), tf.cast(stop, tf.float64)
  i0 = tf.searchsorted(edges, start[None], side="right", out_type=tf.int32)[0] - 1
  i1 = tf.searchsorted(edges, stop[None], side="left", out_type=tf.int32)[0]
  i0 = tf.clip_by_value(i0, 0, num_out)
  return i0, tf.clip_by_value(i1, i0, num_out)


def _resample_block(mask, y_edges, x_edges):
  """uint8 `[h, w]` -> uint8 `[len(y_edges) - 1, len(x_edges) - 1]`, see `resample`: the
  overlap lengths of output and source pixels along each axis as sparse matrices, applied to
  the rows and then to the columns."""
  x = tf.sparse.sparse_dense_matmul(
    _overlaps(y_edges, tf.shape(mask)[0]), tf.cast(mask, tf.float32)
  )  # [Hm, w]
  inside = tf.sparse.sparse_dense_matmul(x, _overlaps(x_edges, tf.shape(mask)[1]), adjoint_b=True)
  area = (y_edges[1:] - y_edges[:-1])[:, None] * (x_edges[1:] - x_edges[:-1])[None, :]
  return tf.cast(tf.cast(inside, tf.float64) >= _HALF * area, tf.uint8)


def _overlaps(edges, size):
  """The lengths of the intersections of output intervals [e_i, e_i+1) with source pixels
  [j, j + 1), j < `size`: a `tf.sparse.SparseTensor` float32 `[len(edges) - 1, size]`.

  Every nonzero is one interval between consecutive points of the merged, sorted edges and
  pixel boundaries, so there are at most len(edges) + size of them, already in row-major
  order."""
  num_out = tf.shape(edges, out_type=tf.int64)[0] - 1
  clipped = tf.clip_by_value(edges, 0.0, tf.cast(size, tf.float64))
  points = tf.sort(tf.concat([clipped, tf.range(tf.cast(size, tf.float64) + 1.0)], axis=0))
  lengths = points[1:] - points[:-1]
  middle = (points[1:] + points[:-1]) / 2
  out = tf.searchsorted(clipped, middle, side="right", out_type=tf.int64) - 1
  src = tf.cast(tf.floor(middle), tf.int64)
  keep = (lengths > 0) & (out >= 0) & (out < num_out) & (src < tf.cast(size, tf.int64))
  return tf.sparse.SparseTensor(
    indices=tf.stack([tf.boolean_mask(out, keep), tf.boolean_mask(src, keep)], axis=1),
    values=tf.cast(tf.boolean_mask(lengths, keep), tf.float32),
    dense_shape=tf.stack([num_out, tf.cast(size, tf.int64)]),
  )


def pad(masks, keep, max_boxes, size):
  """The masks of the kept objects, padded (or truncated) to `max_boxes`.

  Args:
    masks: uint8 `[n, Hm, Wm]`; keep: bool `[n]`; size: (Hm, Wm).

  Returns:
    uint8 `[max_boxes, Hm, Wm]`, zeros after the kept ones (as `transforms.pad_targets`).
  """
  masks = tf.boolean_mask(masks, keep)[:max_boxes]
  masks = tf.pad(masks, [[0, max_boxes - tf.shape(masks)[0]], [0, 0], [0, 0]])
  return tf.ensure_shape(masks, [max_boxes, *size])
