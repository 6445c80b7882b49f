#!/usr/bin/env bash
# Instructions the daemon's user-space stages spend per command, counted exactly (callgrind),
# for each case of the pipeline bench (daemon/benches/pipeline.rs: p1, p1-watched,
# p1-watched-other, p16, mixed, and captured-p1/captured-p16 when benches/capture-records.sh has
# written them): the records of a case go through `Stages` once, and only that run is counted (not
# making the records). Both sides of a command together, as the bench's ns/command.
# Usage: benches/pipeline-instructions.sh [case...]   (needs valgrind; builds the bench)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v valgrind >/dev/null || { echo "pipeline-instructions.sh: needs valgrind" >&2; exit 1; }
bench=$(cargo bench -p respwatchd --bench pipeline --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "pipeline" and m.get("executable"):
        print(m["executable"])')
[ -x "$bench" ] || { echo "pipeline-instructions.sh: the bench did not build" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cases=("$@")
if [ ${#cases[@]} -eq 0 ]; then
  cases=(p1 p1-watched p1-watched-other p16 mixed)
  for captured in p1 p16; do
    [ -f "target/bench-records/$captured.records" ] && cases+=("captured-$captured")
  done
fi
printf '%18s %16s %10s\n' case instructions/cmd commands
for case in "${cases[@]}"; do
  line=$(RESPWATCH_BENCH_CASE=$case valgrind --tool=callgrind --callgrind-out-file="$out/$case" \
    --toggle-collect='*run_case*' "$bench" --bench 2>/dev/null)
  commands=$(awk '{print $3}' <<<"$line")
  total=$(awk '/^summary:/ {print $2}' "$out/$case")
  awk -v c="$case" -v t="$total" -v n="$commands" 'BEGIN { printf "%18s %16.0f %10d\n", c, t / n, n }'
done
