"""Run pytest's GPU tests in several worker processes sharing one GPU.

    PYTHONPATH=. python experiments/run_gpu_tests.py tests/test_mosaic.py -k api --workers 6

Most of a GPU test's time is compiling (on the CPU) kernels and the float32
reference; one process uses one core for that. This collects the `gpu`-marked
tests of the given paths, groups them by their parameter id (the tests of one
case share a cached result inside a process, so they must land in the same
worker), deals the groups out to the workers, and runs one pytest per worker
with GPU memory preallocation off. Prints each worker's summary line and the
failures, and exits non-zero if any worker failed or skipped a test.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time


def collect(paths: list[str], extra: list[str]) -> list[str]:
  out = subprocess.run(
      [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
       "-p", "no:cacheprovider", *extra, *paths],
      capture_output=True, text=True, check=False)
  ids = [line for line in out.stdout.splitlines() if "::" in line]
  if not ids:
    sys.exit(f"no gpu tests collected:\n{out.stdout}\n{out.stderr}")
  return ids


def group_key(node_id: str) -> str:
  """The file and parameter id: tests of one case share a cache within a process."""
  path = node_id.split("::")[0]
  match = re.search(r"\[(.*)\]$", node_id)
  return f"{path}[{match.group(1) if match else node_id}]"


def deal(ids: list[str], workers: int) -> list[list[str]]:
  groups = collections.defaultdict(list)
  for node_id in ids:
    groups[group_key(node_id)].append(node_id)
  shares = [[] for _ in range(workers)]
  for members in sorted(groups.values(), key=len, reverse=True):
    min(shares, key=len).extend(members)  # largest groups first: balanced shares
  return [s for s in shares if s]


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("paths", nargs="+")
  p.add_argument("--workers", type=int, default=4)
  p.add_argument("-k", dest="keyword", default=None, help="as pytest -k")
  p.add_argument("--timeout", type=float, default=560.0, help="seconds for all workers")
  args = p.parse_args()
  extra = ["-k", args.keyword] if args.keyword else []
  shares = deal(collect(args.paths, extra), args.workers)
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  start = time.time()
  procs = []
  with tempfile.TemporaryDirectory() as tmp:
    for n, share in enumerate(shares):
      ids_file = os.path.join(tmp, f"ids{n}.txt")
      with open(ids_file, "w") as f:
        f.write("\n".join(share))
      log = open(os.path.join(tmp, f"log{n}.txt"), "w+")
      cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
             "-rf", *extra, *share]
      procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                    log, len(share)))
    failed = False
    for n, (proc, log, count) in enumerate(procs):
      try:
        rc = proc.wait(timeout=max(1.0, args.timeout - (time.time() - start)))
      except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
      log.seek(0)
      lines = log.read().splitlines()
      summary = next((l for l in reversed(lines) if re.search(r"passed|failed|error|skipped", l)),
                     "(no summary line)")
      print(f"worker {n}: {count} tests, rc={rc}: {summary}", flush=True)
      if rc != 0 or "skipped" in summary:  # a skipped GPU test is not a pass
        failed = True
        print("\n".join(l for l in lines if l.startswith(("FAILED", "ERROR", "E "))
                        )[-4000:], flush=True)
  print(f"all workers: {sum(c for _, _, c in procs)} tests in {time.time() - start:.0f} s, "
        f"{'NOT ALL PASSED' if failed else 'all passed'}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
