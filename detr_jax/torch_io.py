"""Reads PyTorch `.pth` / `.pth.tar` and `.safetensors` weight files without torch.

- `load(path)`: the object stored in the file, every tensor as a NumPy array of the same
  dtype, shape and values (bit for bit what `torch.load(path, weights_only=True)` gives).
- `load_pth(path)`: `torch.save` files in the zip format (the default since PyTorch 1.6).
  The pickle inside is read by a restricted unpickler that builds only tensors (from the
  archive's raw storages), `OrderedDict`, `Counter` and plain containers, numbers, strings and
  bytes; any other class or function named by the file is an error that names it, and no code
  from the file runs. An `argparse.Namespace` (the reference release stores its command-line
  arguments as one) is rebuilt as a plain dict of its attributes, without importing argparse
  or calling anything from the file. The legacy (pre-1.6) format is refused with the
  command that re-saves it.
- `load_safetensors(path)`: a `.safetensors` file, through the `safetensors` package.

Supported tensor dtypes: float64/32/16, bfloat16 (`ml_dtypes.bfloat16`), int64/32/16/8,
uint8, bool.
"""

import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np
import safetensors

# torch storage class (as named in a pickle) -> NumPy dtype.
_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
# safetensors dtype names -> NumPy dtype.
_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
_RESAVE = (
  're-save it with a recent PyTorch: python -c "import torch; '
  "torch.save(torch.load('OLD.pth', weights_only=True), 'NEW.pth')\""
)


class UnsupportedFileError(ValueError):
  """The file is not a weights file this module can read safely."""


class _StorageType:
  """Stand-in for a `torch.<X>Storage` class: only carries the element dtype."""

  def __init__(self, name):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Namespace(dict):
  """An `argparse.Namespace` rebuilt as a dict of its attributes (pickle's BUILD state)."""

  def __setstate__(self, state):
    self.update(state)


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
  """A tensor as a NumPy array: `size` elements read from `storage` at `offset` with `stride`.

  storage: 1-D array of the storage's dtype; offset, size, stride: in elements, as torch.
  Returns a new contiguous array (no memory shared with the storage or other tensors).
  """
  del requires_grad, hooks, metadata  # autograd state and tensor metadata are not weights
  if not isinstance(storage, np.ndarray):
    raise UnsupportedFileError(f"tensor storage is a {type(storage).__name__}, not a storage")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  offset = int(offset)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise UnsupportedFileError(f"bad tensor geometry: offset {offset} size {size} stride {stride}")
  if 0 not in size:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
      raise UnsupportedFileError(f"tensor reads past its storage ({last} >= {storage.size})")
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
    storage[offset:] if storage.size > offset else storage[:0],
    shape=size,
    strides=tuple(s * item for s in stride),
    writeable=False,
  )
  return np.array(view, copy=True, order="C")


def _rebuild_parameter(data, requires_grad, hooks):
  """An `nn.Parameter` is read as its data."""
  del requires_grad, hooks
  return data


def _latin1_encode(text, encoding):
  """Protocol-2 pickles store bytes as `_codecs.encode(text, "latin1")`."""
  if not isinstance(text, str) or encoding != "latin1":
    raise UnsupportedFileError(f"_codecs.encode({type(text).__name__}, {encoding!r}) refused")
  return text.encode("latin1")


_ALLOWED = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("collections", "Counter"): collections.Counter,
  ("builtins", "set"): set,
  ("builtins", "frozenset"): frozenset,
  ("__builtin__", "set"): set,  # protocol 2 uses Python 2 module names
  ("__builtin__", "frozenset"): frozenset,
  ("_codecs", "encode"): _latin1_encode,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("argparse", "Namespace"): _Namespace,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a torch `data.pkl`, taking storages from the zip archive `archive`."""

  def __init__(self, file, archive, prefix, byteorder):
    super().__init__(file)
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages = {}

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise UnsupportedFileError(
      f"refusing to load '{module}.{name}': only tensors, OrderedDict and plain containers, "
      "numbers and strings are read (pickled code is never executed)"
    )

  def persistent_load(self, pid):
    """pid = ('storage', storage type, key, location, numel) -> 1-D array of the storage."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise UnsupportedFileError(f"unknown persistent id {pid!r:.80}")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
      raise UnsupportedFileError(f"bad storage reference {pid!r:.80}")
    if key not in self._storages:
      raw = self._archive.read(f"{self._prefix}data/{key}")
      dtype = storage_type.dtype
      if len(raw) != numel * dtype.itemsize:
        raise UnsupportedFileError(f"storage {key}: {len(raw)} bytes for {numel} x {dtype}")
      data = np.frombuffer(raw, np.uint8).reshape(numel, dtype.itemsize)
      if self._byteorder != "little":
        data = data[:, ::-1]  # to little-endian element by element
      self._storages[key] = np.ascontiguousarray(data).view(dtype.newbyteorder("<")).ravel()
    return self._storages[key]


def load_pth(path):
  """Reads a `torch.save` zip archive; tensors come back as NumPy arrays (see module doc)."""
  if not zipfile.is_zipfile(path):
    raise UnsupportedFileError(
      f"{path}: not a zip-format torch.save file (legacy pre-1.6 torch.save format, or not a "
      f"PyTorch checkpoint); {_RESAVE}"
    )
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise UnsupportedFileError(f"{path}: expected one <name>/data.pkl, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    with archive.open(pickles[0]) as f:
      try:
        return _RestrictedUnpickler(f, archive, prefix, byteorder).load()
      except UnsupportedFileError as e:
        raise UnsupportedFileError(f"{path}: {e}") from None


def load_safetensors(path):
  """Reads a `.safetensors` file: dict of name -> NumPy array (little-endian by the format)."""
  with open(path, "rb") as f:
    data = f.read()
  out = {}
  for name, t in safetensors.deserialize(data):
    if t["dtype"] not in _SAFETENSORS_DTYPES:
      raise UnsupportedFileError(f"{path}: tensor {name!r} has unsupported dtype {t['dtype']}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[t["dtype"]]).newbyteorder("<")
    out[name] = np.frombuffer(t["data"], dtype).reshape(t["shape"]).copy()
  return out


def load(path):
  """A `.pth` / `.pth.tar` / `.pt` (zip) or `.safetensors` file, told apart by content."""
  with open(path, "rb") as f:
    head = f.read(9)
  if head[:2] == b"PK":
    return load_pth(path)
  if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
    return load_safetensors(path)
  return load_pth(path)  # refused there with a message that says how to re-save it
