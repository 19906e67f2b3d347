"""Pretrained weight files: torchvision ImageNet ResNet URLs, download once into a cache.

- `torchvision_resnet_url(backbone)`: the torchvision ImageNet (v1) checkpoint the reference
  DETR starts from, for resnet18/34/50/101.
- `fetch(url_or_path, cache_dir=None)`: a local file is used as it is; a URL is downloaded
  once into the cache (`cache_dir`, else `$DETR_JAX_CACHE`, else `~/.cache/detr_jax`, or
  `$XDG_CACHE_HOME/detr_jax`) under its file name, written to a temporary file and renamed
  into place only when complete (and, for a name carrying a hash prefix after its last dash as
  torchvision's do, only when the file's sha256 starts with it). A file already at the cache
  path is used without a request, so a copy fetched by hand can be dropped there.
- `resolve_backbone_weights(spec, backbone, cache_dir=None)`: the local file for a
  `model.backbone_weights` value ("torchvision", a path, a URL), or None for "".

Any failure to download (offline, HTTP error, interrupted transfer, bad checksum) raises a
`FetchError` naming the URL, the cache path and how to point the config at a local copy.
"""

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from absl import logging

from detr_jax import runtime

CACHE_ENV = "DETR_JAX_CACHE"
TORCHVISION_BASE_URL = "https://download.pytorch.org/models/"
TORCHVISION_FILES = {
  "resnet18": "resnet18-f37072fd.pth",
  "resnet34": "resnet34-b627a593.pth",
  "resnet50": "resnet50-0676ba61.pth",
  "resnet101": "resnet101-63fe2227.pth",
}
CONFIG_HINT = (
  "model.backbone_weights takes 'torchvision', a local path, a URL, or '' for random init"
)


class FetchError(runtime.UserError):
  """A weights file could not be downloaded into the cache (the message says what to do)."""


class WeightsNotFound(runtime.UserError, FileNotFoundError):
  """A local weights file named by the config does not exist."""


def torchvision_resnet_url(backbone):
  """URL of torchvision's ImageNet checkpoint for `backbone` ("resnet18" ... "resnet101")."""
  if backbone not in TORCHVISION_FILES:
    raise ValueError(f"No torchvision ImageNet weights for {backbone!r}: {list(TORCHVISION_FILES)}")
  return TORCHVISION_BASE_URL + TORCHVISION_FILES[backbone]


def default_cache_dir():
  """`$DETR_JAX_CACHE`, else `$XDG_CACHE_HOME/detr_jax`, else `~/.cache/detr_jax`."""
  if os.environ.get(CACHE_ENV):
    return os.environ[CACHE_ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "detr_jax")


def _is_url(s):
  return "://" in s


def expected_hash_prefix(filename):
  """The sha256 prefix a file name carries after its last dash (`resnet50-0676ba61.pth`)."""
  m = re.search(r"-([0-9a-f]{8,64})\.[^-]*$", filename)
  return m[1] if m else None


def fetch(url_or_path, cache_dir=None, timeout=60):
  """The local path of a weights file; a URL is downloaded into the cache on first use.

  Logs whether the file was local, a cache hit or downloaded. Raises FileNotFoundError for a
  missing local path and FetchError for a failed download (see the module docstring).
  """
  if not _is_url(url_or_path):
    if not os.path.isfile(url_or_path):
      raise WeightsNotFound(f"{url_or_path}: no such weights file ({CONFIG_HINT})")
    logging.info("Weights %s: local file", url_or_path)
    return url_or_path
  url = url_or_path
  name = os.path.basename(urllib.parse.urlsplit(url).path)
  if not name:
    raise ValueError(f"{url}: the URL names no file")
  dest = os.path.join(cache_dir or default_cache_dir(), name)
  if os.path.isfile(dest):
    logging.info("Weights %s: cache hit %s", url, dest)
    return dest
  _download(url, dest, timeout)
  logging.info("Weights %s: downloaded to %s", url, dest)
  return dest


def _download(url, dest, timeout):
  """Streams `url` into a temporary file next to `dest`, checks it, then renames it to `dest`."""
  tmp = None
  try:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.")
    sha, size = hashlib.sha256(), 0
    with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
      expected_size = response.headers.get("Content-Length")
      while chunk := response.read(1 << 20):
        f.write(chunk)
        sha.update(chunk)
        size += len(chunk)
      f.flush()
      os.fsync(f.fileno())
    if expected_size is not None and size != int(expected_size):
      raise FetchError(f"transfer interrupted after {size} of {expected_size} bytes")
    prefix = expected_hash_prefix(os.path.basename(dest))
    if prefix and not sha.hexdigest().startswith(prefix):
      raise FetchError(
        f"checksum mismatch: sha256 {sha.hexdigest()} does not start with {prefix} (the file "
        "name's hash)"
      )
    os.replace(tmp, dest)
    tmp = None
  except (OSError, http.client.HTTPException, FetchError) as e:  # URLError is an OSError
    raise FetchError(
      f"Could not download {url} into the cache path {dest}: {e}.\n"
      f"To use a local copy, download the file elsewhere and either put it at {dest} or set "
      f"the config field model.backbone_weights to its path ({CONFIG_HINT}); the cache "
      f"directory is set by ${CACHE_ENV}."
    ) from e
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)


def resolve_backbone_weights(spec, backbone, cache_dir=None):
  """Local file for a `model.backbone_weights` value, or None for "" (random init).

  spec: "torchvision" (the ImageNet checkpoint of `backbone`), a local path or a URL.
  """
  if not spec:
    return None
  if spec == "torchvision":
    spec = torchvision_resnet_url(backbone)
  return fetch(spec, cache_dir)
