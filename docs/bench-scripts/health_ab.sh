#!/bin/bash
# /health latency while a server tokenizes a 7.5 MiB prompt and steps a full batch of 32 streams:
# a base revision's server against this tree's, one after the other, the same client (bench health).
# Usage: docs/bench-scripts/health_ab.sh [BASE_REV]   (from the repository root, after `make install`)
set -eu
base_rev=${1:-9d1d6b1}
root=$(pwd)
base=$(mktemp -d)/base
git worktree add -q "$base" "$base_rev"
trap 'git worktree remove --force "$base"' EXIT
run() {  # name, source dir, port, extra serve flags
  # run from the source dir: `python -m` puts the working directory first on sys.path
  (cd "$2" && TUNESERVE_QUIET=1 "$root/.venv/bin/python" -m tuneserve.cli.main serve smollm2-135m --port "$3" \
     --max-num-seqs 32 --max-request-bytes 16777216 --log-level warning $4 >/dev/null 2>&1) &
  local pid=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$3/health" >/dev/null && break; sleep 0.5; done
  "$root/.venv/bin/tuneserve" bench health --base-url "http://127.0.0.1:$3" --prompt-mib 7.5 --batch 32 \
     --max-tokens 64 --json "health_$1.json" --p99-limit-ms 100000 || true
  pkill -f "serve smollm2-135m --port $3" || true
  wait $pid 2>/dev/null || true
}
run base "$base" 8611 ""
run new "$root" 8612 "--max-prompt-chars 16777216"
