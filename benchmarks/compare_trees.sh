#!/bin/bash
# Runs the pipeline, data-plane and real-swarm skip benchmarks on two source trees side by side,
# interleaved, on the same machine state: the check that a refactor left the figures within noise.
# usage: benchmarks/compare_trees.sh OLD_TREE NEW_TREE [PYTHON]
#   e.g. git worktree add /tmp/old <commit>; benchmarks/compare_trees.sh /tmp/old "$PWD"
# Each tree runs its own benchmarks/ scripts with PYTHONPATH=TREE, so the old tree may have another layout.
set -u
OLD=$1; NEW=$2; PY=${3:-python}
run() { # name tree args...
  local name=$1 tree=$2; shift 2
  echo "=== $name ($tree) $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  (cd "$tree" && PYTHONPATH="$tree" timeout 900 "$PY" "$@") 2>&1 | tail -25
}
for round in 1 2; do
  run pipeline-old "$OLD" benchmarks/bench_pipeline.py --delay 0.1 --steps 20 --trainers 4
  run pipeline-new "$NEW" benchmarks/bench_pipeline.py --delay 0.1 --steps 20 --trainers 4
done
run dataplane-old "$OLD" benchmarks/bench_dataplane.py --mib 64 --repeats 3
run dataplane-new "$NEW" benchmarks/bench_dataplane.py --mib 64 --repeats 3
run skipswarm-old "$OLD" benchmarks/bench_skip_swarm.py --layout slow-middle --steps 20
run skipswarm-new "$NEW" benchmarks/bench_skip_swarm.py --layout slow-middle --steps 20
