"""Input pipeline throughput: our tf.data training chain vs. a PIL + NumPy implementation.

Both run the seed re-implementation's COCO training chain at 1024 x 1024 on the same
COCO-like images (JPEG, 640 x 480 and similar sizes, 7 boxes each, written to a temporary
COCO-format folder): mosaic with probability `--mosaic_prob` (four images, each resized to
shorter side 800, maybe cropped, resized to a quadrant), horizontal flip, the reference's
random choice between a multi-scale resize and resize -> random size crop -> multi-scale
resize, the final resize to 1024 x 1024, ImageNet normalization to float32, boxes to
normalized cxcywh, batches of `--batch_size`.

The baseline is what a PyTorch re-implementation's Dataset does per example (PIL ops, NumPy
for the tensor conversion and normalization), run in one process and by a multiprocessing
pool (like DataLoader workers; `--workers 0,2`), with batches collated in the main process.
Each run prints images/s and the CPU milliseconds spent per image (steadier than images/s when
other work shares the machine).

  python benchmarks/input_speed.py --mosaic_prob 0.5

`--masks` runs the tf.data chain alone with instance masks as well (`data.masks`, every
annotation a polygon, masks at 1024 / `--mask_stride`), to compare with the run without.
"""

import argparse
import json
import multiprocessing
import os
import random
import resource
import tempfile
import time

import numpy as np
from PIL import Image

MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
STD = np.asarray([0.229, 0.224, 0.225], np.float32)
SCALES = list(range(480, 801, 32))
SIZE = 1024


def write_coco_like_folder(root, num_images, seed=0):
  """JPEGs with COCO-like sizes and file sizes, and their annotations.json."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  sizes = [(480, 640), (640, 480), (427, 640), (375, 500), (480, 640), (512, 640)]
  images, annotations = [], []
  for i in range(num_images):
    h, w = sizes[i % len(sizes)]
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx / rng.uniform(5, 40))[..., None] * rng.uniform(-1, 1, 3)
    image = base + 40 * np.cos(yy / rng.uniform(5, 40))[..., None] * rng.uniform(-1, 1, 3)
    image += rng.normal(0, 20, image.shape)
    for _ in range(7):
      bw, bh = rng.integers(20, w // 2), rng.integers(20, h // 2)
      x, y = rng.integers(0, w - bw), rng.integers(0, h - bh)
      image[y : y + bh, x : x + bw] = rng.integers(0, 255, 3)
      annotations.append(
        dict(
          id=len(annotations) + 1,
          image_id=i + 1,
          category_id=int(rng.integers(1, 5)),
          bbox=[int(x), int(y), int(bw), int(bh)],
          area=int(bw * bh),
          iscrowd=0,
          segmentation=[
            [int(x), int(y), int(x + bw), int(y), int(x + bw), int(y + bh), int(x), int(y + bh)]
          ],
        )
      )
    name = f"{i:06d}.jpg"
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
      os.path.join(root, "images", name), quality=90
    )
    images.append(dict(id=i + 1, file_name=name, width=w, height=h))
  categories = [dict(id=c, name=f"class{c}") for c in range(1, 5)]
  path = os.path.join(root, "annotations.json")
  with open(path, "w") as f:
    json.dump(dict(images=images, annotations=annotations, categories=categories), f)
  return path, os.path.join(root, "images")


# ---------------------------------------------------------------------------------------------
# The PIL + NumPy baseline (the seed re-implementation's transforms, per example).
# ---------------------------------------------------------------------------------------------
class PilChain:
  """The chain as a PyTorch Dataset's __getitem__ does it: PIL image ops, NumPy boxes."""

  def __init__(self, annotations, images_dir, mosaic_prob):
    with open(annotations) as f:
      data = json.load(f)
    self.files = {im["id"]: os.path.join(images_dir, im["file_name"]) for im in data["images"]}
    self.ids = sorted(self.files)
    self.boxes = {i: [] for i in self.ids}
    self.labels = {i: [] for i in self.ids}
    for a in data["annotations"]:
      x, y, w, h = a["bbox"]
      self.boxes[a["image_id"]].append([x, y, x + w, y + h])
      self.labels[a["image_id"]].append(a["category_id"])
    self.mosaic_prob = mosaic_prob

  def load(self, image_id):
    image = Image.open(self.files[image_id]).convert("RGB")
    boxes = np.asarray(self.boxes[image_id], np.float32).reshape(-1, 4)
    return image, boxes, np.asarray(self.labels[image_id], np.int64)

  @staticmethod
  def resize(image, boxes, size, max_size=None):
    w, h = image.size
    if isinstance(size, tuple):
      oh, ow = size
    else:
      if max_size is not None and size / min(h, w) * max(h, w) > max_size:
        size = int(round(max_size / max(h, w) * min(h, w)))
      if w < h:
        ow, oh = size, int(size * h / w)
      else:
        oh, ow = size, int(size * w / h)
    image = image.resize((ow, oh), Image.BILINEAR)
    return image, boxes * np.asarray([ow / w, oh / h, ow / w, oh / h], np.float32)

  @staticmethod
  def crop(image, boxes, labels, top, left, h, w):
    cropped = boxes - np.asarray([left, top, left, top], np.float32)
    cropped = np.clip(cropped, 0, [w, h, w, h]).astype(np.float32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (cropped[:, 2] - cropped[:, 0]) * (cropped[:, 3] - cropped[:, 1])
    keep = (cropped[:, 2] > cropped[:, 0]) & (cropped[:, 3] > cropped[:, 1])
    keep &= inside > 0.5 * area
    if not keep.any():
      return image, boxes, labels
    return image.crop((left, top, left + w, top + h)), cropped[keep], labels[keep]

  def random_size_crop(self, image, boxes, labels, min_size=384, max_size=600):
    w = random.randint(min(int(image.width * 0.5), min_size), min(image.width, max_size))
    h = random.randint(min(int(image.height * 0.5), min_size), min(image.height, max_size))
    top, left = random.randint(0, image.height - h), random.randint(0, image.width - w)
    return self.crop(image, boxes, labels, top, left, h, w)

  def mosaic(self, first):
    parts = [first] + [self.load(random.choice(self.ids)) for _ in range(3)]
    canvas = Image.new("RGB", (800, 800))
    all_boxes, all_labels = [], []
    for q, (image, boxes, labels) in enumerate(parts):
      image, boxes = self.resize(image, boxes, 800, 1333)
      if random.random() < 0.5:
        w = random.randint(int(image.width * 0.5), image.width)
        h = random.randint(int(image.height * 0.5), image.height)
        top, left = random.randint(0, image.height - h), random.randint(0, image.width - w)
        image, boxes, labels = self.crop(image, boxes, labels, top, left, h, w)
      image, boxes = self.resize(image, boxes, (400, 400))
      dy, dx = 400 * (q // 2), 400 * (q % 2)
      canvas.paste(image, (dx, dy))
      all_boxes.append(boxes + np.asarray([dx, dy, dx, dy], np.float32))
      all_labels.append(labels)
    return canvas, np.concatenate(all_boxes), np.concatenate(all_labels)

  def __call__(self, index):
    image, boxes, labels = self.load(self.ids[index % len(self.ids)])
    if random.random() < self.mosaic_prob:
      image, boxes, labels = self.mosaic((image, boxes, labels))
    if random.random() < 0.5:
      w = image.width
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
      boxes = boxes[:, [2, 1, 0, 3]] * np.asarray([-1, 1, -1, 1], np.float32) + [w, 0, w, 0]
    if random.random() < 0.5:
      image, boxes = self.resize(image, boxes, random.choice(SCALES), 1333)
    else:
      image, boxes = self.resize(image, boxes, random.choice([400, 500, 600]))
      image, boxes, labels = self.random_size_crop(image, boxes, labels)
      image, boxes = self.resize(image, boxes, random.choice(SCALES), 1333)
    image, boxes = self.resize(image, boxes, (SIZE, SIZE))
    array = (np.asarray(image, np.float32) / 255.0 - MEAN) / STD
    boxes = boxes / SIZE
    cxcywh = np.stack(
      [
        (boxes[:, 0] + boxes[:, 2]) / 2,
        (boxes[:, 1] + boxes[:, 3]) / 2,
        boxes[:, 2] - boxes[:, 0],
        boxes[:, 3] - boxes[:, 1],
      ],
      axis=1,
    )
    return array, cxcywh.astype(np.float32), labels


_CHAIN = None


def _init_worker(chain, seed):
  global _CHAIN
  _CHAIN = chain
  random.seed(seed + os.getpid())


def _work(index):
  return _CHAIN(index)


def bench_pil(annotations, images_dir, *, mosaic_prob, workers, batch_size, num_batches):
  chain = PilChain(annotations, images_dir, mosaic_prob)
  total = (num_batches + 2) * batch_size

  def batches(results):
    pending = []
    for r in results:
      pending.append(r)
      if len(pending) == batch_size:
        yield np.stack([p[0] for p in pending]), [p[1] for p in pending]
        pending = []

  if workers == 0:
    _init_worker(chain, 0)
    return _time(batches(map(_work, range(total))), batch_size, num_batches)
  ctx = multiprocessing.get_context("fork")
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  with ctx.Pool(workers, initializer=_init_worker, initargs=(chain, 0)) as pool:
    rate, main_cpu = _time(batches(pool.imap(_work, range(total))), batch_size, num_batches)
    pool.close()
    pool.join()
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  child = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
  return rate, main_cpu + 1000 * child / total  # every task ran once in a worker


def bench_tf(annotations, images_dir, *, mosaic_prob, batch_size, num_batches, mask_stride=0):
  """`mask_stride` > 0: with instance masks at SIZE / mask_stride."""
  import input_pipeline  # TensorFlow only here: the PIL baseline's workers fork without it
  from configs import base

  cfg = base.get_data_config()
  cfg.name = "coco_folder"
  cfg.train_annotations = annotations
  cfg.train_images = images_dir
  cfg.mosaic_prob = mosaic_prob
  cfg.max_boxes = 100
  cfg.masks = mask_stride > 0
  cfg.mask_stride = mask_stride if mask_stride > 0 else cfg.mask_stride
  it = input_pipeline.create_train_iterator(
    cfg,
    image_size=(SIZE, SIZE),
    global_batch_size=batch_size,
    seed=0,
    process_count=1,
    process_index=0,
  )
  return _time(it, batch_size, num_batches)


def _time(batches, batch_size, num_batches):
  """(images/s, CPU ms of this process per image) over `num_batches` batches after two
  warm-up batches. The CPU time is less sensitive than the rate to other load on the machine."""
  batches = iter(batches)
  for _ in range(2):
    next(batches)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(batches)
  images = num_batches * batch_size
  return images / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / images


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mosaic_prob", type=float, default=0.5)
  parser.add_argument(
    "--workers", default="0,2", help="PIL runs: comma-separated pool sizes (0: one process)"
  )
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--num_batches", type=int, default=12)
  parser.add_argument("--num_images", type=int, default=48)
  parser.add_argument("--only", choices=("tf", "pil"), default=None)
  parser.add_argument("--masks", action="store_true", help="tf.data with and without masks")
  parser.add_argument("--mask_stride", type=int, default=4)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    annotations, images_dir = write_coco_like_folder(root, args.num_images)
    sizes = [os.path.getsize(os.path.join(images_dir, f)) for f in os.listdir(images_dir)]
    print(
      f"{args.num_images} JPEGs, mean {np.mean(sizes) / 1024:.0f} KiB; {os.cpu_count()} CPU cores; "
      f"{SIZE} x {SIZE}, mosaic_prob {args.mosaic_prob}, batch {args.batch_size}"
    )
    common = dict(mosaic_prob=args.mosaic_prob, batch_size=args.batch_size)
    if args.masks:
      for stride in (0, args.mask_stride):
        rate, cpu = bench_tf(
          annotations, images_dir, num_batches=args.num_batches, mask_stride=stride, **common
        )
        what = f"with masks at stride {stride}" if stride else "without masks"
        print(f"tf.data input_pipeline {what}: {rate:.1f} images/s, {cpu:.0f} CPU ms/image")
      return
    pil = {}
    if args.only in (None, "pil"):
      for workers in (int(w) for w in args.workers.split(",")):
        pil[workers], cpu = bench_pil(
          annotations, images_dir, workers=workers, num_batches=args.num_batches, **common
        )
        what = "one process" if workers == 0 else f"pool of {workers} processes"
        print(f"PIL + NumPy, {what}: {pil[workers]:.1f} images/s, {cpu:.0f} CPU ms/image")
    if args.only in (None, "tf"):
      tf_rate, cpu = bench_tf(annotations, images_dir, num_batches=args.num_batches, **common)
      print(f"tf.data input_pipeline: {tf_rate:.1f} images/s, {cpu:.0f} CPU ms/image")
    if pil and args.only is None:
      best = max(pil.values())
      print(f"speed-up over the faster PIL run: {tf_rate / best:.2f}x")


if __name__ == "__main__":
  main()
