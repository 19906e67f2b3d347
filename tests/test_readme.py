"""Every command in the README's bash blocks parses as written (paths and placeholders aside).

train.py, eval.py and predict.py command lines are parsed by the programs' own absl flags
(train.py's `--config.FIELD=VALUE` overrides by ml_collections, then `validate_config`);
`python -m detr_jax.convert` lines by its argparse parser; `python -c` snippets compile;
`pip install -e ".[extra]"` names an extra of setup.cfg. `.ci/run` runs the ones that need
no data (`.ci/readme_commands.py`: the quickstart, eval, and the predict example).
"""

import configparser
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Placeholders the README uses for the user's own paths and values.
PLACEHOLDERS = {
  "DATA_DIR": "/tmp/readme_data",
  "DIR": "/tmp/readme_dir",
  "K": "3",
  "...": "configs/tiny.py",
}
PROGRAMS = ("train.py", "eval.py", "predict.py")


def readme_commands():
  """Each shell command of the README's bash blocks: a list of words (comments dropped,
  continuation lines joined, `&&` chains split, `[optional]` brackets removed, placeholders
  replaced)."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in _logical_lines(block):
      command = []
      for word in shlex.split(line, comments=True) + ["&&"]:
        if word == "&&":
          if command:
            commands.append(command)
          command = []
        else:
          command.append(_fill(word))
  return commands


def _fill(word):
  """A README word with its placeholder (whole, or after `=`) replaced, `[--optional`
  brackets removed."""
  if word.startswith("[--"):
    word = word[1:]
  if word.endswith("]") and "[" not in word:
    word = word[:-1]
  key, eq, value = word.rpartition("=")
  if eq and value in PLACEHOLDERS:
    return key + eq + PLACEHOLDERS[value]
  return PLACEHOLDERS.get(word, word)


def _logical_lines(block):
  """Lines of a shell block with `\\` continuations and multi-line quoted strings joined."""
  lines, current = [], ""
  for raw in block.splitlines():
    current = f"{current}\n{raw}" if current else raw
    if current.endswith("\\"):
      current = current[:-1] + " "
      continue
    try:
      shlex.split(current, comments=True)
    except ValueError:  # an open quote: the command goes on
      continue
    lines.append(current)
    current = ""
  return lines


def _program_commands(name):
  """The argument lists of README commands that run `python NAME` (also inside gcloud's
  --command string)."""
  out = []
  for words in readme_commands():
    if words[:1] == ["gcloud"]:
      inner = words[words.index("--command") + 1]
      words = shlex.split(inner.split("&&")[-1])
    if words[:2] == ["python", name]:
      out.append(words[2:])
  return out


# Parses each command with the program's own flags, in one process: ml_collections' config
# flag defines the `--config.FIELD` flags when it parses `--config`, so they are removed
# before the next command is parsed, as in a fresh process.
_PARSE = r"""
import importlib.util, json, sys
from absl import flags
program, commands = sys.argv[1], json.loads(sys.argv[2])
spec = importlib.util.spec_from_file_location("prog", program)
prog = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prog)
results = []
for argv in commands:
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  sys.argv = [program, *argv]
  flags.FLAGS(sys.argv)
  if hasattr(flags.FLAGS, "config"):
    from detr_jax import trainer
    trainer.validate_config(flags.FLAGS.config, 1, 1)
    results.append(flags.FLAGS.config.to_dict())
  else:
    results.append(None)
print("RESULTS" + json.dumps(results, default=str))
"""


@pytest.mark.parametrize("program", PROGRAMS)
def test_program_commands_parse(program):
  commands = _program_commands(program)
  assert commands, f"the README shows no {program} command"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
    [sys.executable, "-c", _PARSE, program, json.dumps(commands)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, f"{commands}\n{proc.stderr[-3000:]}"
  configs = json.loads(proc.stdout.split("RESULTS", 1)[1])
  assert len(configs) == len(commands)
  if program == "train.py":
    # The overrides took effect (a sample of them).
    by_args = {" ".join(c): cfg for c, cfg in zip(commands, configs)}
    for args, cfg in by_args.items():
      if "--config.data.data_dir=/tmp/readme_data" in args:
        assert cfg["data"]["data_dir"] == "/tmp/readme_data"
      if "--config.model.num_classes=3" in args:
        assert cfg["model"]["num_classes"] == 3


def test_convert_commands_parse():
  from detr_jax import config_utils, convert

  commands = [w[3:] for w in readme_commands() if w[:3] == ["python", "-m", "detr_jax.convert"]]
  assert len(commands) >= 2
  for args in commands:
    parsed = convert.parser().parse_args(args)
    config_utils.load_config_file(os.path.join(REPO, parsed.config))


def test_python_snippets_compile_and_pip_extras_exist():
  extras = configparser.ConfigParser()
  extras.read(os.path.join(REPO, "setup.cfg"))
  known = set(extras["options.extras_require"])
  snippets, installs = 0, 0
  for words in readme_commands():
    if words[:2] == ["python", "-c"]:
      compile(words[2], "README python -c", "exec")
      snippets += 1
    if words[:3] == ["pip", "install", "-e"]:
      spec = words[3]
      assert spec == "." or re.fullmatch(r"\.\[[\w,]+\]", spec), spec
      for extra in re.findall(r"[\w]+", spec[1:]):
        assert extra in known, f"README installs .[{extra}], not an extra of setup.cfg"
      installs += 1
  assert snippets >= 2 and installs >= 3


def test_every_command_is_known():
  """A README command this file does not check is a command nobody runs."""
  checked = (
    ("python", "train.py"),
    ("python", "eval.py"),
    ("python", "predict.py"),
    ("python", "-m"),
    ("python", "-c"),
    ("pip", "install"),
    ("gcloud", "compute"),
    ("mkdir", "-p"),
    ("tensorboard", "--logdir"),
  )
  for words in readme_commands():
    assert tuple(words[:2]) in checked, f"README command not covered by tests: {words}"
