#!/bin/bash
# One sitting of grid_v3 (recipes/grid_v3_tiny_en.yaml) on a machine that may be gone at the next: run from the
# repository root after `bash .ci/setup`.
#
#   bash results/grid_v3_tiny_en/sitting.sh restore   put the kept points back under runs/grid_v3_tiny_en (the sweep skips them)
#   bash results/grid_v3_tiny_en/sitting.sh start     two lanes in the background, one thread each (Ray's one CPU a point
#                                                     set the same), each running its points one after another;
#                                                     the two points running at once are a PARP/MPI-fixed pair
#   bash results/grid_v3_tiny_en/sitting.sh keep      copy every finished point under results/grid_v3_tiny_en/runs (without
#                                                     weights, the final mask gzipped) and print the README's status block
#
# A point takes about 85 min with the two lanes busy (16 s an update, 300 updates, then 6 min of scoring); one that
# has not finished when the machine goes is lost with its checkpoints. Stop the lanes with
# `kill -- -PID` for each PID in runs/grid_v3_tiny_en-lanes.pid.
set -euo pipefail
RUNS=runs/grid_v3_tiny_en
KEPT=results/grid_v3_tiny_en/runs
RECIPE=recipes/grid_v3_tiny_en.yaml
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run bash .ci/setup first" >&2; exit 2; }

lane() {  # run the named points one after another; the sweep skips a finished one and resumes a started one
  for point in "$@"; do
    OMP_NUM_THREADS=1 .venv/bin/parpkit sweep "$RECIPE" --quiet --only "$point" || echo "lane: $point failed" >&2
  done
}

case "${1:-}" in
  restore)
    mkdir -p "$RUNS" && cp -rn "$KEPT"/. "$RUNS"/
    for f in "$RUNS"/*/masks.safetensors.gz; do [ -f "${f%.gz}" ] || gunzip -k "$f"; done
    .venv/bin/parpkit sweep "$RECIPE" --dry-run | grep -c finished | xargs echo "points finished:" ;;
  start)
    a=() b=()
    for seed in 3 4; do for sparsity in 0.5 0.7; do
      a+=("method-parp_sparsity-${sparsity}_seed-$seed"); b+=("method-fixed_sparsity-${sparsity}_seed-$seed")
    done; done
    for seed in 0 1 2; do
      a+=("method-parp400_sparsity-0.5_seed-$seed"); b+=("method-parp400_sparsity-0.7_seed-$seed")
    done
    mkdir -p "$RUNS"
    : > "$RUNS-lanes.pid"
    for name in a b; do
      declare -n points="$name"
      setsid bash -c "$(declare -f lane); RECIPE=$RECIPE; lane ${points[*]}" > "$RUNS-lane-$name.log" 2>&1 < /dev/null &
      echo $! >> "$RUNS-lanes.pid"
    done
    echo "lanes started (logs: $RUNS-lane-a.log, $RUNS-lane-b.log; pids: $RUNS-lanes.pid)" ;;
  keep)
    for d in "$RUNS"/*/; do
      [ -f "$d/metrics.json" ] || continue
      k="$KEPT/$(basename "$d")"; mkdir -p "$k"
      cp "$d"/{recipe.yaml,metrics.json,log.jsonl,sparsity.csv} "$d"/transcripts_*.jsonl "$k/"
      gzip -n -c "$d/masks.safetensors" > "$k/masks.safetensors.gz"
    done
    cp "$RUNS/sweep.json" "$KEPT/"
    "$PY" results/grid_v3_tiny_en/status.py ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
