#!/usr/bin/env bash
# `make bench`: every benchmark that runs on a CPU machine, then the summary and plots.
# Usage: bash bench/run.sh [--quick]   (--quick: one-second gateway runs, for debugging)
# Writes bench/results/*.json, bench/results/SUMMARY.md and bench/results/*.png.
# Benchmarks print numbers; they never assert timings.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
QUICK=()
if [[ "${1:-}" == "--quick" ]]; then QUICK=(--quick); fi

echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" bench/placement.py
"$PY" -m bench.gateway "${QUICK[@]}"
"$PY" -m bench.shadow_overhead "${QUICK[@]}"
"$PY" -m bench.routing "${QUICK[@]}"
"$PY" -m bench.registry_bench "${QUICK[@]}"
"$PY" -m bench.engine_suite "${QUICK[@]}"
"$PY" -m bench.noisy_neighbour "${QUICK[@]}"
"$PY" -m bench.profile_gateway
"$PY" -m bench.report
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
