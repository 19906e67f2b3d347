"""detr_jax/runtime.py: the compile policy and the start-up."""

import errno

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax import conv, runtime


def test_compiler_options_compile_and_keep_results():
  opts = runtime.compiler_options()
  assert opts in ({}, runtime._CPU_OPTIONS)
  if jax.default_backend() == "cpu":
    assert opts, "this jaxlib no longer knows the epilogue-fusion option; update runtime.py"
  x = jax.random.normal(jax.random.key(0), (64, 32))
  w = jax.random.normal(jax.random.key(1), (32, 16))
  f = lambda x, w: jax.nn.relu(conv.matmul(x, w) * 2.0 + 1.0)
  np.testing.assert_allclose(
    jax.jit(f, compiler_options=opts)(x, w), jax.jit(f)(x, w), rtol=1e-6, atol=1e-6
  )


def test_compiler_options_keep_reductions_whole():
  """With the options a large sum stays one reduce (fused with its square), not the
  reduce-window rewrite that made LayerNorm, softmax and the gradient norm 15x slower."""
  x = jnp.ones((3, 3, 512, 512))
  hlo = (
    jax.jit(lambda x: jnp.sum(x * x), compiler_options=runtime.compiler_options())
    .lower(x)
    .compile()
    .as_text()
  )
  assert "reduce-window" not in hlo


def test_user_errors_and_a_full_disk_end_with_the_message_alone(capsys):
  def main_raising(error):
    def main(argv):
      raise error

    return runtime.main_with_user_errors(main)

  for error, message in [
    (runtime.UserError("Checkpoint step 6 cannot be read"), "Checkpoint step 6 cannot be read"),
    (OSError(errno.ENOSPC, "No space left on device"), "Out of disk space: [Errno 28] No space"),
  ]:
    with pytest.raises(SystemExit) as e:
      main_raising(error)([])
    assert e.value.code == 1
    assert f"ERROR: {message}" in capsys.readouterr().err
  with pytest.raises(PermissionError):  # any other error keeps its traceback
    main_raising(PermissionError(errno.EACCES, "Permission denied"))([])
