"""TensorFlow image and box ops of the input pipeline: decode, crop, flip, mosaic, resize.

Conventions:
  * Boxes inside this module are `[n, 4]` float32 xyxy in pixels of the image they belong
    to, with pixel edges at integer coordinates (a box covering pixel columns 3..5 is
    x0 = 3, x1 = 6). The pipeline's output boxes are cxcywh normalized to [0, 1].
  * A crop window is int32 `[4]` = (y0, x0, y1, x1) in source pixels, end exclusive.
  * Randomness is stateless: every function takes a `key` (int64 `[2]`) and derives sub-keys
    with `tf.random.experimental.stateless_split`, so the same key gives the same result.
  * Geometry is sampled before decoding (the window only needs the image size), so JPEGs are
    decoded with `decode_and_crop_jpeg` and every image is resampled exactly once to its place
    in the output.
"""

import numpy as np
import tensorflow as tf

# ImageNet RGB mean and std of images in [0, 1]: float32 `[3]` (the one copy; the drawing code
# imports them to undo the normalization).
IMAGENET_MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.asarray((0.229, 0.224, 0.225), np.float32)

# For functions given to tf.data: they have no Python control flow on tensors, and skipping
# AutoGraph's source transformation makes building a pipeline several times faster.
no_autograph = tf.autograph.experimental.do_not_convert


# ---------------------------------------------------------------------------------------------
# Random helpers.
# ---------------------------------------------------------------------------------------------
def split_key(key, num):
  """Splits an int64 `[2]` key into `num` independent keys (a list)."""
  return tf.unstack(tf.random.experimental.stateless_split(key, num))


def uniform(key):
  """A float32 scalar uniform in [0, 1)."""
  return tf.random.stateless_uniform([], key)


def randint(key, low, high):
  """An int32 scalar uniform in [low, high] (both inclusive; high < low is read as low)."""
  low = tf.cast(low, tf.int32)
  high = tf.maximum(tf.cast(high, tf.int32), low)
  return tf.random.stateless_uniform([], key, minval=low, maxval=high + 1, dtype=tf.int32)


def choice(key, values):
  """A uniformly chosen element of the 1-D constant `values`."""
  values = tf.constant(values)
  return values[randint(key, 0, tf.shape(values)[0] - 1)]


# ---------------------------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------------------------
def image_size(image_bytes, known_size):
  """Height and width of an encoded image.

  Args:
    image_bytes: tf.string scalar, any format `tf.io.decode_image` reads.
    known_size: int32 `[2]` (h, w) when the source knows it, (-1, -1) otherwise.

  Returns:
    int32 `[2]` (h, w). JPEGs are measured from their header; other formats are decoded.
  """

  def probe():
    return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.io.extract_jpeg_shape(image_bytes)[:2],
      lambda: tf.shape(_decode_full(image_bytes))[:2],
    )

  return tf.cond(known_size[0] > 0, lambda: known_size, probe)


def _decode_full(image_bytes):
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


def decode_window(image_bytes, window):
  """Decodes the crop window of an encoded image.

  Args:
    image_bytes: tf.string scalar (JPEG, PNG, GIF, BMP, WebP; grayscale, RGBA, palette and
      CMYK images become RGB).
    window: int32 `[4]` (y0, x0, y1, x1) inside the image.

  Returns:
    uint8 `[y1 - y0, x1 - x0, 3]`.
  """
  y0, x0, y1, x1 = tf.unstack(window)

  def jpeg():
    crop = tf.stack([y0, x0, y1 - y0, x1 - x0])
    return tf.io.decode_and_crop_jpeg(image_bytes, crop, channels=3)

  def other():
    return _decode_full(image_bytes)[y0:y1, x0:x1]

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  return tf.ensure_shape(image, [None, None, 3])


def resize(image, size):
  """Bilinear resize (half-pixel centers) of a float32 `[h, w, C]` image to `[*size, C]`.

  Skips the resampling when the image already has that size.
  """
  size = tf.convert_to_tensor(size, tf.int32)
  same = tf.reduce_all(tf.shape(image)[:2] == size)
  return tf.cond(same, lambda: image, lambda: tf.image.resize(image, size, method="bilinear"))


def resize_and_normalize(image, size, distort=None):
  """uint8 `[h, w, 3]` -> ImageNet-normalized float32 `[*size, 3]`.

  Bilinear resizing is a per-pixel convex combination, so it commutes with the per-channel
  affine normalization: the normalization runs at whichever resolution has fewer pixels.

  Args:
    image: uint8 `[h, w, 3]`.
    size: (H, W) of the output.
    distort: optional fn float32 `[h, w, 3]` in [0, 1] -> the same (photometric distortion),
      applied before the normalization.
  """
  size = tf.convert_to_tensor(size, tf.int32)

  x = tf.cast(image, tf.float32)
  shape = tf.shape(image)
  # Downscale first when the output is smaller; the last resize is then a no-op (and the
  # first one when upscaling).
  x = tf.cond(shape[0] * shape[1] > size[0] * size[1], lambda: resize(x, size), lambda: x)
  if distort is not None:
    x = distort(x / 255.0) * 255.0
  return resize(normalize(x), size)


def eval_image(image, size):
  """The eval preprocessing of one decoded image (the eval split and `predict.py` share it).

  Args:
    image: uint8 `[h, w, 3]`, the whole image.
    size: (H, W) of the model input.

  Returns:
    float32 `[H, W, 3]`: the image resized to (H, W) without keeping the aspect ratio
    (bilinear), ImageNet-normalized.
  """
  return resize_and_normalize(image, size)


# ---------------------------------------------------------------------------------------------
# Boxes.
# ---------------------------------------------------------------------------------------------
def sanitize_boxes(boxes, size):
  """Keeps finite boxes with positive area after clipping to the image.

  Args:
    boxes: `[n, 4]` xyxy pixels.
    size: int32 `[2]` (h, w) of the image.

  Returns:
    (clipped boxes `[n, 4]`, keep bool `[n]`).
  """
  h = tf.cast(size[0], tf.float32)
  w = tf.cast(size[1], tf.float32)
  finite = tf.reduce_all(tf.math.is_finite(boxes), axis=1)
  boxes = tf.where(finite[:, None], boxes, tf.zeros_like(boxes))
  boxes = tf.clip_by_value(boxes, 0.0, tf.stack([w, h, w, h]))
  keep = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return boxes, keep


def _area(boxes):
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def crop_boxes(boxes, window, min_visible_fraction):
  """Boxes of an image after cropping it to `window`.

  Args:
    boxes: `[n, 4]` xyxy pixels of the image.
    window: int32 `[4]` (y0, x0, y1, x1).
    min_visible_fraction: a box is kept when at least this fraction of its area lies inside
      the window (and the part inside has positive width and height).

  Returns:
    (boxes `[n, 4]` xyxy in pixels of the crop, clipped to it; keep bool `[n]`).
  """
  window = tf.cast(window, tf.float32)
  y0, x0, y1, x1 = tf.unstack(window)
  shifted = boxes - tf.stack([x0, y0, x0, y0])
  clipped = tf.clip_by_value(shifted, 0.0, tf.stack([x1 - x0, y1 - y0, x1 - x0, y1 - y0]))
  inside = _area(clipped)
  positive = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  keep = positive & (inside >= min_visible_fraction * _area(boxes))
  return clipped, keep


def scale_flip_shift_boxes(boxes, from_size, to_size, flip, offset=(0, 0)):
  """Boxes after resizing an image from `from_size` to `to_size`, an optional horizontal
  flip (of the resized image) and a shift by `offset` = (dy, dx) pixels.

  Args:
    boxes: `[n, 4]` xyxy pixels.
    from_size, to_size: (h, w) int32.
    flip: bool scalar.
    offset: (dy, dx) added after the flip.

  Returns:
    `[n, 4]` xyxy pixels.
  """
  from_size = tf.cast(from_size, tf.float32)
  to_size = tf.cast(to_size, tf.float32)
  sy = to_size[0] / from_size[0]
  sx = to_size[1] / from_size[1]
  x0, y0, x1, y1 = tf.unstack(boxes * tf.stack([sx, sy, sx, sy]), axis=1)
  fx0 = tf.where(flip, to_size[1] - x1, x0)
  fx1 = tf.where(flip, to_size[1] - x0, x1)
  dy = tf.cast(offset[0], tf.float32)
  dx = tf.cast(offset[1], tf.float32)
  return tf.stack([fx0 + dx, y0 + dy, fx1 + dx, y1 + dy], axis=1)


def xyxy_to_normalized_cxcywh(boxes, size):
  """`[n, 4]` xyxy pixels -> cxcywh normalized by the image size (h, w), clipped to [0, 1]."""
  size = tf.cast(size, tf.float32)
  norm = tf.stack([size[1], size[0], size[1], size[0]])
  x0, y0, x1, y1 = tf.unstack(tf.clip_by_value(boxes / norm, 0.0, 1.0), axis=1)
  return tf.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=1)


# ---------------------------------------------------------------------------------------------
# Window sampling.
# ---------------------------------------------------------------------------------------------
def full_window(size):
  """The window covering a whole image of size (h, w)."""
  return tf.stack([0, 0, size[0], size[1]])


def sample_size_crop(key, size, *, resize_sizes, min_size, max_size):
  """The reference's `RandomResize(resize_sizes)` -> `RandomSizeCrop(min_size, max_size)` as a
  window in the source image.

  The shorter side is resized to one of `resize_sizes`; crop sides are drawn from
  [min(min_size, side // 2), min(side, max_size)] of the resized image (the seed
  re-implementation's bound, so small images can be cropped too), and the crop is mapped back
  to source pixels.

  Args:
    key: int64 `[2]`.
    size: int32 `[2]` (h, w) of the source image.

  Returns:
    int32 `[4]` window with at least one pixel per side.
  """
  k_size, k_h, k_w, k_top, k_left = split_key(key, 5)
  h = tf.cast(size[0], tf.float32)
  w = tf.cast(size[1], tf.float32)
  scale = tf.cast(choice(k_size, resize_sizes), tf.float32) / tf.minimum(h, w)
  rh = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), 1)
  rw = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), 1)
  ch = randint(k_h, tf.minimum(rh // 2, min_size), tf.minimum(rh, max_size))
  cw = randint(k_w, tf.minimum(rw // 2, min_size), tf.minimum(rw, max_size))
  ch = tf.maximum(ch, 1)
  cw = tf.maximum(cw, 1)
  top = randint(k_top, 0, rh - ch)
  left = randint(k_left, 0, rw - cw)
  return _resized_to_source(top, left, ch, cw, scale, size)


def sample_fraction_crop(key, size, *, min_fraction):
  """A window whose sides are uniform fractions in [min_fraction, 1] of the image's sides,
  at a uniform position (the seed re-implementation's `RandomCrop` before a mosaic)."""
  k_h, k_w, k_top, k_left = split_key(key, 4)
  ch = randint(k_h, tf.cast(tf.cast(size[0], tf.float32) * min_fraction, tf.int32), size[0])
  cw = randint(k_w, tf.cast(tf.cast(size[1], tf.float32) * min_fraction, tf.int32), size[1])
  ch = tf.maximum(ch, 1)
  cw = tf.maximum(cw, 1)
  top = randint(k_top, 0, size[0] - ch)
  left = randint(k_left, 0, size[1] - cw)
  return tf.stack([top, left, top + ch, left + cw])


def _resized_to_source(top, left, ch, cw, scale, size):
  """Maps a crop (top, left, ch, cw) of the image resized by `scale` to source pixels."""
  f = lambda v: tf.cast(tf.round(tf.cast(v, tf.float32) / scale), tf.int32)
  y0 = tf.clip_by_value(f(top), 0, size[0] - 1)
  x0 = tf.clip_by_value(f(left), 0, size[1] - 1)
  y1 = tf.clip_by_value(f(top + ch), y0 + 1, size[0])
  x1 = tf.clip_by_value(f(left + cw), x0 + 1, size[1])
  return tf.stack([y0, x0, y1, x1])


def maybe_crop(key, prob, size, boxes, sample_window, min_visible_fraction):
  """With probability `prob`, a window from `sample_window(key, size)`, unless it would keep
  none of the boxes (then, as with prob 0, the full image).

  Returns:
    (window int32 `[4]`, boxes `[n, 4]` in pixels of the window, keep bool `[n]`).
  """
  k_apply, k_window = split_key(key, 2)
  window = sample_window(k_window, size)
  cropped, keep = crop_boxes(boxes, window, min_visible_fraction)
  use_crop = (uniform(k_apply) < prob) & tf.reduce_any(keep)
  window = tf.where(use_crop, window, full_window(size))
  boxes = tf.where(use_crop, cropped, boxes)
  keep = tf.where(use_crop, keep, tf.ones_like(keep))
  return window, boxes, keep


# ---------------------------------------------------------------------------------------------
# Photometric distortion and normalization.
# ---------------------------------------------------------------------------------------------
def photometric_distort(key, image, prob):
  """With probability `prob`: brightness, contrast, saturation factors in [0.5, 1.5] and a hue
  shift in [-18/255, 18/255] turns (the seed re-implementation's ranges; fixed order).

  Args:
    image: float32 `[H, W, 3]` in [0, 1].

  Returns:
    float32 `[H, W, 3]` in [0, 1].
  """
  k_apply, k_b, k_c, k_s, k_h = split_key(key, 5)

  def distort():
    x = image * tf.random.stateless_uniform([], k_b, 0.5, 1.5)
    x = tf.image.stateless_random_contrast(tf.clip_by_value(x, 0.0, 1.0), 0.5, 1.5, k_c)
    x = tf.image.stateless_random_saturation(tf.clip_by_value(x, 0.0, 1.0), 0.5, 1.5, k_s)
    x = tf.image.stateless_random_hue(tf.clip_by_value(x, 0.0, 1.0), 18 / 255, k_h)
    return tf.clip_by_value(x, 0.0, 1.0)

  return tf.cond(uniform(k_apply) < prob, distort, lambda: image)


def normalize(image_255):
  """float32 `[H, W, 3]` in [0, 255] -> ImageNet mean/std normalized.

  Computed on the `[H, W * 3]` view with per-column scale and offset rows: TensorFlow
  broadcasts along a contiguous row much faster than over a trailing dimension of 3.
  """
  inv_std = 1.0 / (tf.constant(IMAGENET_STD, tf.float32) * 255.0)
  offset = -tf.constant(IMAGENET_MEAN, tf.float32) * 255.0 * inv_std
  shape = tf.shape(image_255)
  rows = tf.reshape(image_255, [shape[0], shape[1] * 3])
  rows = rows * tf.tile(inv_std, [shape[1]]) + tf.tile(offset, [shape[1]])
  return tf.reshape(rows, shape)


def pad_targets(boxes, labels, max_boxes):
  """Pads (or truncates) targets to a static `max_boxes`.

  Args:
    boxes: `[n, 4]` cxcywh normalized.
    labels: int32 `[n]`.

  Returns:
    dict with boxes float32 `[T, 4]`, labels int32 `[T]`, valid bool `[T]` and the int32
    scalar `num_truncated` (objects beyond `max_boxes`, dropped).
  """
  n = tf.shape(labels)[0]
  kept = tf.minimum(n, max_boxes)
  pad = max_boxes - kept
  boxes = tf.pad(boxes[:kept], [[0, pad], [0, 0]])
  labels = tf.pad(labels[:kept], [[0, pad]])
  valid = tf.range(max_boxes) < kept
  return dict(
    boxes=tf.ensure_shape(boxes, [max_boxes, 4]),
    labels=tf.ensure_shape(labels, [max_boxes]),
    valid=valid,
    num_truncated=n - kept,
  )
