"""Files written whole or not at all: a temporary file renamed over the target."""

import json
import os


def write_atomic(path, write):
  """Calls `write(f)` on a temporary binary file beside `path`, then renames it to `path`.

  A crash or a full disk mid-write leaves the previous `path` (or none), never a partial one.
  """
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path, obj, **dump_kwargs):
  """`obj` as JSON at `path`, atomically (`json.dumps` keyword arguments pass through)."""
  write_atomic(path, lambda f: f.write(json.dumps(obj, **dump_kwargs).encode()))
