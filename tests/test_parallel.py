"""Context parallelism on 8 host CPU devices, run in a child process.

The device count (XLA_FLAGS=--xla_force_host_platform_device_count=8) must be
set before JAX starts, and in this pytest process other test files have
started JAX already. So the cases, in `tests/parallel_cases.py`, run in a
fresh `python -m pytest` with the flag set; its report is shown on failure.
"""

import os
import pathlib
import subprocess
import sys

CASES = pathlib.Path(__file__).with_name("parallel_cases.py")
# 8 host devices; and less LLVM optimisation: compiling dominates these
# tiny cases, and -O0 halves it.
CHILD_XLA_FLAGS = ("--xla_force_host_platform_device_count=8 "
                   "--xla_backend_optimization_level=0")
TIMEOUT_S = 170  # the whole file must stay under 3 minutes on 2 CPU cores


def test_context_parallel_cases_pass_on_8_host_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {CHILD_XLA_FLAGS}".strip())
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
      cwd=CASES.parent.parent, env=env, capture_output=True, text=True,
      timeout=TIMEOUT_S)
  report = proc.stdout + proc.stderr
  print(report.strip().splitlines()[-1] if report.strip() else "(no output)")
  assert proc.returncode == 0, f"tests/parallel_cases.py failed:\n{report[-20000:]}"
