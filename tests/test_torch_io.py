"""Torch-free reading of torch.save and safetensors files, against torch.load itself."""

import argparse
import collections
import os
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch

from detr_jax import torch_io


def _bits(x):
  """The raw bytes and dtype name of a torch tensor or NumPy array, for bit-exact comparison."""
  if isinstance(x, torch.Tensor):
    x = x.contiguous()
    if x.dtype == torch.bfloat16:
      return x.view(torch.int16).numpy().tobytes(), "bfloat16", tuple(x.shape)
    return x.numpy().tobytes(), str(x.numpy().dtype), tuple(x.shape)
  return np.ascontiguousarray(x).tobytes(), str(x.dtype), x.shape


def _tensors():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(5, 6, generator=g)
  return collections.OrderedDict(
    f32=torch.randn(3, 4, generator=g),
    f64=torch.randn(2, generator=g).double(),
    f16=torch.randn(3, 2, generator=g).half(),
    bf16=torch.randn(4, 3, generator=g).bfloat16(),
    i64=torch.tensor(7),  # a num_batches_tracked-like scalar buffer
    i64_vec=torch.arange(-3, 5),
    i32=torch.arange(4, dtype=torch.int32),
    u8=torch.arange(250, 256, dtype=torch.uint8),
    boolean=torch.tensor([True, False, True]),
    transposed=base.t(),  # non-contiguous view of a storage shared with the next ones
    offset_slice=base[2:, 1:4],
    shared_base=base,
    expanded=torch.randn(3, 1, generator=g).expand(3, 4),
    empty=torch.zeros(0, 3),
    parameter=torch.nn.Parameter(torch.ones(2)),
  )


def test_every_tensor_reads_back_bit_identical_to_torch_load(tmp_path):
  path = str(tmp_path / "tensors.pth")
  torch.save({"model": _tensors()}, path)
  ref = torch.load(path, weights_only=True)["model"]
  ours = torch_io.load(path)["model"]
  assert isinstance(ours, collections.OrderedDict) and list(ours) == list(ref)
  for name, tensor in ref.items():
    assert _bits(ours[name]) == _bits(tensor.detach()), name
  assert ours["bf16"].dtype == ml_dtypes.bfloat16
  # Tensors sharing a storage come back as independent arrays.
  ours["shared_base"][0, 0] = 123.0
  assert ours["transposed"][0, 0] != 123.0


def test_plain_containers_and_the_reference_namespace(tmp_path):
  path = str(tmp_path / "misc.pth.tar")
  obj = {
    "args": argparse.Namespace(lr=1e-4, backbone="resnet50", lr_drop=[200]),
    "epoch": 499,
    "numbers": (1, 2.5, None, True, -(2**40)),
    "text": "ü",
    "raw": b"\x00\xff",
    "ids": {1, 2},
    "counts": collections.Counter({400: 1}),
    "nested": [{"x": torch.ones(1)}],
  }
  torch.save(obj, path)
  ours = torch_io.load(path)
  assert ours["args"] == {"lr": 1e-4, "backbone": "resnet50", "lr_drop": [200]}
  assert isinstance(ours["args"], dict) and not isinstance(ours["args"], argparse.Namespace)
  for key in ("epoch", "numbers", "text", "raw", "ids", "counts"):
    assert ours[key] == obj[key], key
  np.testing.assert_array_equal(ours["nested"][0]["x"], np.ones(1, np.float32))


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def test_no_code_from_the_file_runs_and_the_class_is_named(tmp_path):
  marker = str(tmp_path / "created_by_the_pickle")
  path = str(tmp_path / "evil.pth")
  torch.save({"w": torch.zeros(1), "payload": _RunsCode(marker)}, path)
  with pytest.raises(torch_io.UnsupportedFileError, match="evil.pth.*'posix.mkdir'"):
    torch_io.load(path)
  assert not os.path.exists(marker)
  torch.save({"when": torch.float16}, path)  # a torch object that is not a tensor
  with pytest.raises(torch_io.UnsupportedFileError, match="'torch.float16'"):
    torch_io.load(path)


def test_legacy_format_is_refused_with_how_to_resave(tmp_path):
  path = str(tmp_path / "old.pth")
  torch.save({"w": torch.zeros(1)}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(torch_io.UnsupportedFileError, match="legacy.*torch.save\\(torch.load"):
    torch_io.load(path)


def test_big_endian_archives_are_byte_swapped(tmp_path):
  """A file written on a big-endian host: its `byteorder` record says so."""
  path, swapped = str(tmp_path / "le.pth"), str(tmp_path / "be.pth")
  tensors = {"f32": torch.randn(2, 3), "bf16": torch.randn(3).bfloat16(), "i64": torch.arange(3)}
  torch.save(tensors, path)
  # Storage key -> element size: torch.save numbers the storages in the order it meets them.
  itemsizes = {str(i): t.element_size() for i, t in enumerate(tensors.values())}
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(swapped, "w") as dst:
    for info in src.infolist():
      data = src.read(info)
      folder, _, leaf = info.filename.rpartition("/")
      if leaf == "byteorder":
        data = b"big"
      elif folder.endswith("/data"):
        size = itemsizes[leaf]
        data = np.frombuffer(data, np.uint8).reshape(-1, size)[:, ::-1].tobytes()
      dst.writestr(info, data)
  ours = torch_io.load(swapped)
  for name, t in tensors.items():
    assert _bits(ours[name]) == _bits(t), name


def test_safetensors_read_back_bit_identical(tmp_path):
  path = str(tmp_path / "model.safetensors")
  tensors = {k: v.detach().contiguous().clone() for k, v in _tensors().items() if k != "empty"}
  tensors["empty"] = torch.zeros(0, 3)
  safetensors.torch.save_file(tensors, path)
  ours = torch_io.load(path)
  assert sorted(ours) == sorted(tensors)
  for name, tensor in tensors.items():
    assert _bits(ours[name]) == _bits(tensor), name
