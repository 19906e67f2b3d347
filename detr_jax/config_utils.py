"""Loading config files outside absl flags (CLIs like `detr_jax.convert`, tests)."""

import ast
import importlib.util
import os


def load_config_file(path):
  """Runs `get_config()` of a config file; `file.py:arg` passes `arg` to it, like config_flags."""
  path, _, arg = path.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config, overrides):
  """Applies `field.sub=value` strings; values parse as Python literals, else stay strings."""
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"Override {item!r} is not FIELD=VALUE")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"Override {item!r}: config has no field {key!r}")
    node[leaf] = value
  return config
