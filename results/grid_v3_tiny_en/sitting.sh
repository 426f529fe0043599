#!/bin/bash
# One sitting of grid_v3 (recipes/grid_v3_tiny_en.yaml) on a machine that may be gone at the next: run from the
# repository root after `bash .ci/setup`.
#
#   bash results/grid_v3_tiny_en/sitting.sh restore   put the kept points back under runs/grid_v3_tiny_en (the sweep skips them)
#   bash results/grid_v3_tiny_en/sitting.sh start [N] N lanes (default 2) in the background, one thread each (Ray's one CPU
#                                                     a point set the same), taking the points left in the recipe's
#                                                     order (a PARP/MPI-fixed pair after another), each lane running
#                                                     its share one after another; refused while lanes still run
#   bash results/grid_v3_tiny_en/sitting.sh keep      copy every finished point under results/grid_v3_tiny_en/runs (without
#                                                     weights, the final mask gzipped) and print the README's status block
#   stop the lanes: for p in $(cat runs/grid_v3_tiny_en-lanes.pid); do kill -- -$p; done
#
# On the 2-core machine (AVX-512) a point takes about 85 min with two lanes busy (16 s an update, 300 updates, then
# 6 min of scoring); with three lanes an update took 23.5 s (2026-12-08: the same 7.8 s of machine an update), so
# three points took 2 h 10 min to 2 h 17 min each, scoring included (seed 3's, 2026-12-08). A sitting of 3 hours, less set-up, restore and the keeping at its end,
# holds those three; two lanes' second pair (at 170 min) it does not. A point not finished when the machine goes
# is lost with its checkpoints.
set -euo pipefail
shopt -s nullglob
RUNS=runs/grid_v3_tiny_en
KEPT=results/grid_v3_tiny_en/runs
RECIPE=recipes/grid_v3_tiny_en.yaml
PY=.venv/bin/python
PIDS=$RUNS-lanes.pid
[ -x "$PY" ] && [ -x .venv/bin/parpkit ] || { echo "no .venv: run bash .ci/setup first" >&2; exit 2; }

lane() {  # run the named points one after another; the sweep skips a finished one and resumes a started one
  for point in "$@"; do
    OMP_NUM_THREADS=1 .venv/bin/parpkit sweep "$RECIPE" --quiet --only "$point" || echo "lane: $point failed" >&2
  done
}

case "${1:-}" in
  restore)
    mkdir -p "$RUNS"
    cp -rn "$KEPT"/. "$RUNS"/ || true  # -n: never over a point of this machine (newer cp says so with status 1)
    for f in "$RUNS"/*/masks.safetensors.gz; do [ -f "${f%.gz}" ] || gunzip -k "$f"; done
    n=0; for m in "$RUNS"/*/metrics.json; do n=$((n + 1)); done
    echo "points finished under $RUNS: $n" ;;
  start)
    lanes=${2:-2}
    [[ "$lanes" =~ ^[1-9]$ ]] || { echo "start N: N lanes, 1 to 9 (got '$lanes')" >&2; exit 2; }
    if [ -f "$PIDS" ]; then
      for p in $(cat "$PIDS"); do
        if kill -0 "$p" 2>/dev/null; then echo "lanes of an earlier start still run ($PIDS: $p): stop them first" >&2; exit 2; fi
      done
    fi
    for k in "$KEPT"/*/; do  # a kept point not put back would be trained again from the start
      [ -f "$RUNS/$(basename "$k")/metrics.json" ] || { echo "$k is kept but not under $RUNS: run restore first" >&2; exit 2; }
    done
    commands=$(.venv/bin/parpkit sweep "$RECIPE" --print-commands)  # one `parpkit run` line a point, in order
    names=$(sed -n "s#.* --output-dir $RUNS/\([^ ]*\) .*#\1#p" <<< "$commands")
    [ -n "$names" ] || { echo "no point found in the lines of --print-commands: $RECIPE" >&2; exit 2; }
    left=()
    while read -r point; do [ -f "$RUNS/$point/metrics.json" ] || left+=("$point"); done <<< "$names"
    [ ${#left[@]} -gt 0 ] || { echo "every point has finished"; exit 0; }
    mkdir -p "$RUNS"
    : > "$PIDS"
    for ((i = 0; i < lanes; i++)); do
      share=()
      for ((j = i; j < ${#left[@]}; j += lanes)); do share+=("${left[j]}"); done
      [ ${#share[@]} -gt 0 ] || continue
      setsid bash -c "$(declare -f lane); RECIPE=$(printf '%q' "$RECIPE"); lane $(printf '%q ' "${share[@]}")" \
        > "$RUNS-lane-$i.log" 2>&1 < /dev/null &
      echo $! >> "$PIDS"
      echo "lane $i: ${share[*]} (log: $RUNS-lane-$i.log)"
    done ;;
  keep)
    for d in "$RUNS"/*/; do
      [ -f "$d/metrics.json" ] || continue
      k="$KEPT/$(basename "$d")"; mkdir -p "$k"
      cp "$d"/{recipe.yaml,metrics.json,log.jsonl,sparsity.csv} "$k/"
      for t in "$d"/transcripts_*.jsonl; do cp "$t" "$k/"; done
      gzip -n -c "$d/masks.safetensors" > "$k/masks.safetensors.gz"
    done
    cp "$RUNS/sweep.json" "$KEPT/"
    "$PY" results/grid_v3_tiny_en/status.py ;;
  *) sed -n '2,18p' "$0" >&2; exit 2 ;;
esac
