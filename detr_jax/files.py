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


def append_line(path, line):
  """Appends `line` and a newline to the text file `path`, flushed.

  A line cut short by a kill is ended first, so it spoils only itself: readers skip lines that
  do not parse.
  """
  with open(path, "ab+") as f:
    if f.tell() > 0:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.write(b"\n")
    f.write(line.encode() + b"\n")
    f.flush()
