"""Fixtures shared by the tests, and the test session's persistent compilation cache.

Every jitted program the suite compiles (in this process, and in the train.py / eval.py
subprocesses, which inherit the environment) is stored in JAX's persistent cache, so a program
compiled by one test loads in the next that builds the same one, and a second run of the suite
loads them all. Set before JAX initializes (this file is imported before any test module).
DETR_JAX_TEST_CACHE=DIR moves the cache; an empty value turns it off.

The suite also compiles with LLVM's optimization level 0 (`--xla_backend_optimization_level=0`
in XLA_FLAGS, inherited by the subprocesses): the tests' programs are tiny, so compiling them
costs more than running them, and level 0 compiles them faster (every check passes at both
levels; see docs/benchmarks.md, "Test suite").
DETR_JAX_TEST_FAST_COMPILE=0 compiles as users do.
"""

import os
import socket
import tempfile

import jax
import pytest

CACHE_DIR = os.environ.get(
  "DETR_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "detr_jax_test_cache")
)
FAST_COMPILE = "--xla_backend_optimization_level=0"
if os.environ.get("DETR_JAX_TEST_FAST_COMPILE", "1") != "0":
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

if CACHE_DIR:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# The slowest files, started first: pytest-xdist (`--dist loadfile`, pyproject.toml) hands
# files to its two workers in collection order, so the long ones do not end the run alone.
SLOW_FILES_FIRST = ("test_train.py", "test_finetune.py", "test_models.py", "test_loss.py")


def pytest_collection_modifyitems(items):
  """Orders the collected tests: SLOW_FILES_FIRST, then the rest as collected."""
  order = lambda item: (
    SLOW_FILES_FIRST.index(item.path.name)
    if item.path.name in SLOW_FILES_FIRST
    else len(SLOW_FILES_FIRST)
  )
  items.sort(key=order)


@pytest.fixture
def no_network(monkeypatch):
  """Makes every socket connection fail, so a test proves it needs no network."""

  def refuse(*args, **kwargs):
    raise OSError("this test must not use the network")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket.socket, "connect_ex", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def fresh_sources():
  """Data sources built anew in the test (the pipeline caches them per data config)."""
  from input_pipeline import pipeline

  pipeline._SOURCES.clear()
  yield
  pipeline._SOURCES.clear()
