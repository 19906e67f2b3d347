"""One image outside tf.data: decoding a file and the eval preprocessing, as the pipeline does.

`predict.py` runs a model on image files with these, so its inputs match the eval split's.
"""

import io

import numpy as np
import tensorflow as tf
from PIL import Image

from input_pipeline import coco_format, transforms


class UnreadableImageError(ValueError):
  """A file that is not a decodable image."""


def load_image(path):
  """Decodes an image file into uint8 `[H, W, 3]` RGB as the coco_folder pipeline does.

  JPEG, PNG, GIF, BMP and WebP are decoded by TensorFlow (its JPEG decoder differs from
  PIL's by a few levels); other formats PIL reads are converted to RGB by PIL. Alpha is
  dropped.

  Raises:
    UnreadableImageError: the file is missing or not a readable image (the message says why).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      if image.format not in coco_format.TF_IMAGE_FORMATS:
        image.load()
        return np.asarray(image.convert("RGB"))
      size = (image.height, image.width)
    decoded = transforms.decode_window(tf.constant(data), transforms.full_window(size))
    return decoded.numpy()
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, tf.errors.OpError) as e:
    raise UnreadableImageError(f"{type(e).__name__}: {e}".strip()) from e


def preprocess_eval_image(image, image_size):
  """uint8 `[H0, W0, 3]` -> float32 `[*image_size, 3]`, the eval split's resize and
  normalization (`transforms.eval_image`)."""
  size = tuple(int(v) for v in image_size)
  return transforms.eval_image(tf.convert_to_tensor(image, tf.uint8), size).numpy()
