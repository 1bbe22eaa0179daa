#!/usr/bin/env bash
# Chains of `lorsum compare` on a leased GPU machine that has no package index and keeps nothing
# between leases. Run from the repository root there; each mode fits one call of the device tool.
#
#   stash DIR             copy the bundle parts carried in DIR (benchmarks.offline_bundle pack)
#                         to /tmp/bundle: one call per part, as a call carries at most 64 MiB
#   launch LANES SECONDS  unpack the bundle, copy the code and the stored results to /tmp, start
#                         the MPS daemon and every lane_* function of the LANES file in a session
#                         of its own (so that it outlives the call), then poll
#   poll SECONDS          wait until every lane has ended or SECONDS have passed, then collect
#
# collect writes $OUT/runs.tgz (the results files written since launch, relative to the results
# folder: `python -m benchmarks.import_device_runs runs.tgz --sha ... --card ...` brings them in)
# and $OUT/logs.tgz, and prints each lane's last line. A LANES file defines lane_* functions; it
# may use $RESULTS (a copy of benchmarks/results), $DATA, `compare ARGS` and
# `chain NAME [--around=...] -- ARGS` (benchmarks.sweep_chain). See lanes-owed.sh.
set -u
BUNDLE=/tmp/bundle UNPACKED=/tmp/lorsum-offline CODE=/tmp/lorsum-code LOGS=/tmp/lorsum-logs
export RESULTS=/tmp/lorsum-results DATA=/tmp/lorsum-offline/data OUT=${OUT:-$PWD/lease-out}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$CODE/src:$CODE:$UNPACKED/site LORSUM_MODELS_DIR=$UNPACKED/models

collect() {
  mkdir -p "$OUT"
  (cd $RESULTS && find . -newer /tmp/lorsum-launched -type f -name '*.json' | sort > /tmp/new.txt &&
    tar czf "$OUT/runs.tgz" -T /tmp/new.txt && echo "$(wc -l < /tmp/new.txt) new results files")
  # the GPU's use at each collect goes into the logs too, so that figures quoted from it are kept
  echo "$(date +%T) $(nvidia-smi --query-gpu=name,utilization.gpu,memory.used,memory.total \
    --format=csv,noheader)" | tee -a $LOGS/nvidia-smi.log
  tar czf "$OUT/logs.tgz" -C "$(dirname $LOGS)" "$(basename $LOGS)"
  for log in $LOGS/*.log; do
    echo "== $(basename "$log"): $(tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -1 | cut -c1-150)"
  done
}

poll() {
  local until=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt "$until" ] && pgrep -f 'lorsum-lane' > /dev/null; do sleep 10; done
  echo "lanes still running: $(pgrep -f 'lorsum-lane' | wc -l)"
  collect
}

case "${1:-}" in
stash)
  mkdir -p $BUNDLE && cp "$2"/* $BUNDLE/ && ls -la $BUNDLE
  ;;
launch)
  lanes=$(realpath "$2")
  python3 -c "import peft" 2>/dev/null || echo "peft is missing: carry its wheel (device README)"
  rm -rf $CODE && mkdir -p $CODE && cp -r src benchmarks pyproject.toml $CODE/
  rm -rf $CODE/benchmarks/results
  (cd $CODE && python3 -m benchmarks.offline_bundle unpack $BUNDLE --to $UNPACKED) || exit 1
  rm -rf $RESULTS && cp -r benchmarks/results $RESULTS && mkdir -p $LOGS
  # Under the MPS daemon (user space; no device setting changes) the lanes' processes run their
  # kernels at once instead of taking turns: 6 processes training the LM task's adapters made
  # 10.41 steps/s with it and 8.01 without (H100, results/throughput/2026-12-07-*). LORSUM_NO_MPS=1
  # leaves it off.
  if [ -z "${LORSUM_NO_MPS:-}" ] && command -v nvidia-cuda-mps-control > /dev/null; then
    nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS daemon started"
  fi
  touch /tmp/lorsum-launched && sleep 1
  for lane in $(grep -o '^lane_[A-Za-z0-9_]*' "$lanes" | sort -u); do
    # bash -c's $0 is "lorsum-lane", so that poll finds the lanes by name.
    setsid nohup bash -c 'cd '$CODE'
      compare() { echo "+ compare $*"; python3 -m benchmarks.compare "$@"; }
      chain() { echo "+ chain $*"; python3 -m benchmarks.sweep_chain "$@"; }
      source "$1"; "$2"; echo "= $2 ended $(date +%T)"' lorsum-lane "$lanes" "$lane" \
      > $LOGS/$lane.log 2>&1 < /dev/null &
  done
  sleep 5
  poll "$3"
  ;;
poll)
  poll "$2"
  ;;
*)
  echo "usage: $0 stash DIR | launch LANES SECONDS | poll SECONDS" >&2
  exit 2
  ;;
esac
