"""Run a selection of tests as several pytest processes side by side, a case's tests in one.

    PYTHONPATH=. python experiments/gpu_shards.py --processes 12 --timeout 550 \\
        --logs /tmp/gpu_logs -- tests/test_mosaic.py -m gpu -k persistent

Compiling dominates the Mosaic GPU tests (25-80 s per kernel, on the CPU), and
the GPU test modules cache each case's results for the several tests that check
them (run_case, case_results). So the selected node ids (`pytest --collect-only`
of the arguments after --) are grouped by their parameter id, the bracketed part
("packed-d128-persistent"), per file, less what --drop matches (the backward
modules' gradient parameter: --drop '(?<=\\[)d[qkv]-' keeps a case's dq, dk and dv
tests together); the groups are dealt to the processes
largest first, each to the least loaded (a group weighs one compile plus a tenth
per test); every process runs its node ids in order, with
XLA_PYTHON_CLIENT_PREALLOCATE=false so that they share the GPU's memory, and is
killed after --timeout seconds.

Writes LOGS/shard_K.log (pytest -v) and LOGS/results.txt, a "node_id OUTCOME"
line per test that reported, and prints the totals. --done FILE leaves out the
node ids that FILE (an earlier results.txt) lists as PASSED: the way to finish
a selection that one call's time limit cut.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time

OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def group_node_ids(node_ids: list[str], drop: str | None = None) -> list[list[str]]:
  """Node ids grouped by (file, parameter id), groups and members in first-seen order;
  a test without parameters is a group of its own. drop: a regex whose matches are
  removed from the parameter ids first, for parameters that do not change what a
  test compiles (e.g. `d[qkv]-`: which gradient of a cached case a test checks)."""
  groups = collections.OrderedDict()
  for node_id in node_ids:
    path, _, name = node_id.partition("::")
    params = name[name.index("["):] if "[" in name else name
    if drop and "[" in name:
      params = re.sub(drop, "", params)
    groups.setdefault((path, params), []).append(node_id)
  return list(groups.values())


def deal(groups: list[list[str]], processes: int) -> list[list[str]]:
  """groups dealt to `processes` shards, heaviest first, each to the least loaded shard
  (ties: the lower shard); a group weighs 1 + 0.1 per test."""
  weight = lambda group: 1 + 0.1 * len(group)  # noqa: E731
  loads, shards = [0.0] * processes, [[] for _ in range(processes)]
  for group in sorted(groups, key=weight, reverse=True):  # stable: first seen first
    k = min(range(processes), key=lambda j: (loads[j], j))
    loads[k] += weight(group)
    shards[k] += group
  return [shard for shard in shards if shard]


def outcomes(log_text: str) -> dict[str, str]:
  """node id -> outcome of the tests that a `pytest -v` log reports."""
  found = {}
  for line in log_text.splitlines():
    match = OUTCOME.match(line)
    if match:
      found[match.group(1)] = match.group(2)
  return found


def collect(pytest_args: list[str]) -> list[str]:
  """Node ids that `pytest --collect-only -q pytest_args` selects."""
  proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *pytest_args],
                        capture_output=True, text=True, check=False)
  ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
  if not ids:
    raise SystemExit(f"no tests selected by {pytest_args}:\n{proc.stdout[-2000:]}"
                     f"{proc.stderr[-2000:]}")
  return ids


def run_shards(shards: list[list[str]], logs: str, timeout: float) -> dict[str, str]:
  """Runs each shard as `pytest -v NODE_IDS` in a process of its own, all at once; returns
  the outcomes of every test that reported before its process ended or was killed."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  procs = []
  for k, shard in enumerate(shards):
    log = open(os.path.join(logs, f"shard_{k}.log"), "w")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *shard],
        stdout=log, stderr=subprocess.STDOUT, env=env), log))
  deadline = time.monotonic() + timeout
  for proc, log in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()
  found = {}
  for k in range(len(shards)):
    with open(os.path.join(logs, f"shard_{k}.log")) as f:
      found.update(outcomes(f.read()))
  return found


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=8)
  parser.add_argument("--timeout", type=float, default=550.0,
                      help="seconds after which every process still running is killed")
  parser.add_argument("--logs", default="gpu_shard_logs", help="directory for the logs")
  parser.add_argument("--done", default=None,
                      help="an earlier results.txt: its PASSED node ids are not run again")
  parser.add_argument("--drop", default=None,
                      help="a regex removed from parameter ids before grouping "
                           "(group_node_ids)")
  parser.add_argument("pytest_args", nargs="+", help="after --: what pytest selects")
  args = parser.parse_args(argv)
  node_ids = collect(args.pytest_args)
  if args.done:
    with open(args.done) as f:
      passed = {line.split()[0] for line in f if line.rstrip().endswith(" PASSED")}
    node_ids = [i for i in node_ids if i not in passed]
  os.makedirs(args.logs, exist_ok=True)
  shards = deal(group_node_ids(node_ids, args.drop), args.processes)
  print(f"{len(node_ids)} tests in {len(shards)} processes", flush=True)
  found = run_shards(shards, args.logs, args.timeout) if node_ids else {}
  with open(os.path.join(args.logs, "results.txt"), "w") as f:
    f.writelines(f"{node_id} {found[node_id]}\n" for node_id in node_ids if node_id in found)
  counts = collections.Counter(found.values())
  not_run = len(node_ids) - len(found)
  print(" ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())),
        f"{not_run} did not report (time limit or crash)")
  return 0 if not_run == 0 and set(counts) <= {"PASSED"} else 1


if __name__ == "__main__":
  sys.exit(main())
