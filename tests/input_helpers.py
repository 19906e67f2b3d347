"""What the input-pipeline tests share: ImageNet statistics in 0..255 and the colours of
the shapes they draw (distinct saturated colours, pairwise distance >= 127, on dark grey)."""

import numpy as np

MEAN = np.asarray([0.485, 0.456, 0.406]) * 255
STD = np.asarray([0.229, 0.224, 0.225]) * 255
PALETTE = np.asarray(
  [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 255),
    (255, 128, 0),
    (128, 0, 255),
    (0, 128, 255),
    (255, 255, 255),
    (128, 255, 0),
    (255, 0, 128),
  ],
  np.float64,
)
BACKGROUND = (40, 40, 40)
