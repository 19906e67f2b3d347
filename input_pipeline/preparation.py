"""Is the TFDS data a config reads prepared? The start-up check and the opt-in preparation.

`check_prepared(config.data)` looks at TFDS's metadata in `data.data_dir` only (no data is
read, nothing is downloaded) and raises `DatasetNotPrepared`, whose message is the whole
answer for the user: which dataset, version and split is missing, where it looked, the command
that prepares it, its size, and the config fields that point at a copy or prepare it.
`ensure_prepared` is what a program calls once at start-up, before building its model: the
check, or with `data.prepare_missing` TFDS's `download_and_prepare` on process 0 first.
"""

import logging
import os

import tensorflow_datasets as tfds

from input_pipeline import sources

# Sizes of the datasets the configs read, from the TFDS catalog (docs/catalog/coco.md and
# voc.md of tensorflow/datasets; the download sizes are also the sums of the archive sizes in
# TFDS's url_checksums). The catalog does not list coco/2017's prepared size; its records
# hold the same JPEGs as the archives.
_KNOWN_SIZES = {
  "coco/2017/1.1.0": ("25.20 GiB", "about 25 GiB"),
  "coco/2017_panoptic/1.1.0": ("19.57 GiB", "19.63 GiB"),
  "voc/2007/5.0.0": ("868.85 MiB", "837.73 MiB"),
  "voc/2012/5.0.0": ("3.59 GiB", "2.44 GiB"),
}


# The closing lines of the message: the config fields that prepare what is missing or point at
# a copy (the same for every TFDS source).
_WAYS_OUT = (
  "Or let training prepare what is missing: python train.py ... "
  "--config.data.prepare_missing=True (process 0 downloads and prepares, the other "
  "processes wait).\n"
  "Or point data.data_dir at a prepared copy: train.py --config.data.data_dir=DIR, "
  "eval.py --override data.data_dir=DIR."
)


class DatasetNotPrepared(RuntimeError):
  """A TFDS dataset or split the config reads is not in its data_dir; the message says what
  to run (print it without a traceback)."""


def check_prepared(data_config, *, train=True):
  """Raises `DatasetNotPrepared` unless every TFDS dataset and split of `config.data` is
  prepared in `data.data_dir` (TFDS's default when empty). Does nothing for the synthetic
  and folder sources. Reads only metadata files; never touches the network.

  Args:
    data_config: `config.data`.
    train: False checks the eval split alone (what evaluation reads).
  """
  if data_config.name not in sources.TFDS_SOURCES:
    return
  problems = [
    problem
    for builder, splits in _builders(data_config, train)
    if (problem := _problem(builder, splits, data_config))
  ]
  if problems:
    raise DatasetNotPrepared("\n\n".join(problems + [_WAYS_OUT]))


def ensure_prepared(data_config, *, is_coordinator, barrier):
  """Makes sure the TFDS data of `config.data` is there; call it on every process, once at
  start-up, before building the model.

  With `data.prepare_missing` False (the default) this is `check_prepared`. With True, the
  coordinator (process 0) downloads and prepares each missing dataset (TFDS shows its
  progress bars) while the other processes wait at `barrier()`; then every process checks
  that it sees the data (processes that do not share `data.data_dir` get the error).

  Args:
    data_config: `config.data`.
    is_coordinator: whether this is process 0.
    barrier: fn() -> None that returns once every process has called it (e.g. a
      multi-host sync); called exactly once on every process with `prepare_missing`, even
      when the preparation fails on the coordinator.

  Raises:
    DatasetNotPrepared: something is still missing.
  """
  if data_config.name not in sources.TFDS_SOURCES:
    return
  if data_config.prepare_missing:
    try:
      if is_coordinator:
        _prepare_missing(data_config)
    finally:
      barrier()
  check_prepared(data_config)


def _builders(data_config, train=True):
  """[(TFDS builder, [`TfdsSplit` it must have])] of a coco, coco_panoptic or voc config, one
  per dataset (train=False: of the eval split only)."""
  train_splits, eval_split = sources.tfds_splits(data_config)
  data_dir = sources.tfds_data_dir(data_config)
  by_name = {}
  for s in [*train_splits, eval_split] if train else [eval_split]:
    by_name.setdefault(s.name, []).append(s)
  return [(tfds.builder(name, data_dir=data_dir), splits) for name, splits in by_name.items()]


def _prepare_missing(data_config):
  """download_and_prepare for every dataset of the config that is not prepared yet."""
  tfds.enable_progress_bar()
  for builder, _ in _builders(data_config):
    if _is_prepared(builder):
      continue
    download, prepared = _sizes(builder)
    logging.info(
      "Preparing TFDS %s in %s (download %s, prepared %s); data.prepare_missing is on.",
      _versioned_name(builder),
      builder.data_dir_root,
      download,
      prepared,
    )
    builder.download_and_prepare()


def _is_prepared(builder):
  """TFDS's `is_prepared`, which also logs a warning when the directory does not exist."""
  return builder.data_path.exists() and builder.is_prepared()


def _dataset_name(builder):
  """'coco/2017': the builder's name and config."""
  config = builder.builder_config.name if builder.builder_config else None
  return f"{builder.name}/{config}" if config else builder.name


def _versioned_name(builder):
  """'coco/2017:1.1.0', as `tfds.builder` and `tfds build` take it."""
  return f"{_dataset_name(builder)}:{builder.version}"


def _problem(builder, splits, data_config):
  """The user-facing paragraph on what is missing of `builder`, or None if nothing is."""
  if not _is_prepared(builder):
    return _not_prepared(builder, splits, data_config)
  bad = []
  for s in splits:
    try:
      builder.info.splits[s.split]
    except (KeyError, ValueError) as e:  # TFDS: unknown split name, or a malformed slice
      bad.append(f"  '{s.split}' ({s.field}): {e}")
  if not bad:
    return None
  have = ", ".join(f"'{name}'" for name in sorted(builder.info.splits.keys()))
  return (
    f"TFDS dataset {builder.info.full_name} in {builder.data_dir_root} has the splits {have}, "
    "not all the config reads:\n" + "\n".join(bad)
  )


def _not_prepared(builder, splits, data_config):
  name = _versioned_name(builder)
  root = builder.data_dir_root
  where = (
    "data.data_dir"
    if data_config.data_dir
    else "TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets: data.data_dir is empty"
  )
  reads = [f"'{s.split}' ({s.field})" for s in splits]
  lines = [
    f"TFDS dataset {_dataset_name(builder)}, version {builder.version}, is not prepared in "
    f"{root} ({where}):"
  ]
  if builder.data_path.exists():
    lines.append(
      f"  {builder.data_dir} holds no complete dataset (no dataset_info.json): an "
      "interrupted preparation? Delete it, then prepare again."
    )
  else:
    lines.append(f"  there is no {builder.data_dir}.")
    others = _other_versions(builder)
    if others:
      lines.append(
        f"  {builder.data_path.parent} holds version(s) {', '.join(others)}; this TFDS "
        f"reads {builder.version}."
      )
  lines.append(f"  The config reads its split(s) {' and '.join(reads)}.")
  download, prepared = _sizes(builder)
  lines.append(f"  Size: {download} to download, {prepared} prepared.")
  manual = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  if manual:
    manual_dir = os.path.join(root, "downloads", "manual")
    lines.append(
      f"  TFDS cannot download it itself: {manual.strip()}\n"
      f"  Put those files in {manual_dir}, then prepare it with:"
    )
  else:
    lines.append("  Prepare it (TFDS downloads the files) with:")
  lines.append(
    f"    python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
    f"data_dir='{root}').download_and_prepare()\""
  )
  lines.append(
    "  or with TFDS's command line (it needs apache-beam installed):\n"
    f"    tfds build {name} --data_dir={root}"
  )
  return "\n".join(lines)


def _other_versions(builder):
  """Versions of the builder's dataset (and config) that its data_dir holds."""
  parent = builder.data_path.parent
  if not parent.exists():
    return []
  return sorted(v.name for v in parent.iterdir() if v.is_dir())


def _sizes(builder):
  """(download size, prepared size) as text: from the builder's info when TFDS knows them
  (a prepared copy's metadata), else from `_KNOWN_SIZES`."""
  info = builder.info
  if info.download_size and info.dataset_size:
    return str(info.download_size), str(info.dataset_size)
  catalog = f"https://www.tensorflow.org/datasets/catalog/{builder.name}"
  return _KNOWN_SIZES.get(info.full_name, (f"unknown (see {catalog})", "unknown"))
