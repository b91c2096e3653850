#!/usr/bin/env bash
# The project's test command (`npm test`): type check, unit tests, then the
# network-namespace integration tests with real QEMU. Ends with one
# "N passed, N failed" line over all test points.
set -uo pipefail
cd "$(dirname "$0")/.."

tools/bootstrap.sh || { echo "0 passed, 1 failed"; exit 1; }

# The real-application tests of the netns phase (netns-tests/apps-core.test.ts) boot a
# Debian guest: install the host's tools and clients for it (as root; apt on a fresh
# machine) and build its image (mmdebstrap, about a minute; cached by a content key under
# .cache/guest-debian), then the soft-dirty lab's image (lab-build.sh, .cache/guest-lab,
# for netns-tests/lab.test.ts), in the background while the checks and unit tests run.
debian_pid=
debian_log=$(mktemp)
trap 'rm -f "$debian_log"' EXIT
if [ "${TETHER_SKIP_NETNS:-0}" != 1 ]; then
  tools/guest/debian/deps.sh || { echo "0 passed, 1 failed"; exit 1; }
  (
    start=$SECONDS
    tools/guest/debian/build.sh >/dev/null && echo "debian guest image ready in $((SECONDS - start)) s" &&
      tools/guest/debian/lab-build.sh >/dev/null && echo "debian lab image (netns-tests/lab.test.ts) ready in $((SECONDS - start)) s"
  ) >"$debian_log" 2>&1 &
  debian_pid=$!
fi

echo "== tsc --noEmit, prettier --check"
# Side by side: each is one busy thread, and the CI machine has two cores.
npx tsc --noEmit &
tsc_pid=$!
npm run --silent lint
lint=$?
wait "$tsc_pid"
tsc=$?
[ "$tsc" = 0 ] && [ "$lint" = 0 ] || { echo "0 passed, 1 failed"; exit 1; }
# The structure's measures (issue 15): no upward import or cycle, no src/ file over 500
# lines or function over 80, no silent .catch, TETHER_FAULTS read in one file, no uncoded
# throw. A violation names its file and line.
echo "== structure (tools/check-structure.ts)"
npx tsx tools/check-structure.ts || { echo "0 passed, 1 failed"; exit 1; }

out=$(mktemp)
trap 'rm -f "$out" "$debian_log"' EXIT
status=0
echo "== unit tests (src/)"
npx tap --reporter=tap $(find src tools -name '*.test.ts' | sort) 2>&1 | tee -a "$out" || status=1
if [ "${TETHER_SKIP_NETNS:-0}" != 1 ]; then
  if ! wait "$debian_pid"; then
    tail -40 "$debian_log"
    echo "not ok 1 - the Debian guest image (tools/guest/debian/build.sh) failed" | tee -a "$out"
    status=1
  fi
  tail -2 "$debian_log"
  echo "== integration tests (netns-tests/, real QEMU in network namespaces)"
  # Two test files at a time: most of a scenario's time is waiting (boots, holds, links),
  # each file's namespaces, TAPs and addresses are its own (lab/cluster.ts), and every
  # interruption lands by construction, so a slower machine only makes a test longer. It
  # also keeps exercising what one file alone on an idle machine never does: a run of two
  # side by side found the relay losing frames at the detach (src/net/nic.ts).
  npx tap --reporter=tap --jobs=2 $(ls netns-tests/*.test.ts) 2>&1 | tee -a "$out" || status=1
fi
if [ "${TETHER_SKIP_NETNS:-0}" != 1 ] && [ "${TETHER_SKIP_BENCH:-0}" != 1 ]; then
  # Once per CI run so the benchmarks never rot: every strategy and output path, no
  # meaningful figures. A crash fails the run; a MISS is a finding, not a failure.
  echo "== benchmark smoke (npm run bench -- --quick)"
  start=$SECONDS
  mkdir -p bench-results
  if npm run --silent bench -- --quick >bench-results/bench-quick.log 2>&1; then
    echo "ok 1 - benchmark smoke ($((SECONDS - start)) s, output in bench-results/bench-quick.log and bench-results/)" | tee -a "$out"
  else
    tail -40 bench-results/bench-quick.log
    echo "not ok 1 - benchmark smoke crashed ($((SECONDS - start)) s, see bench-results/bench-quick.log)" | tee -a "$out"
    status=1
  fi
fi
# A failure's lines and the YAML diagnostics under them, again at the end: the tail of a
# CI log is often all that is kept, and a failure is what must be in it.
if grep -Eq '^\s*not ok [0-9]+' "$out"; then
  echo "== failures (each 'not ok' with the 24 lines after it)"
  grep -En -A24 '^\s*not ok [0-9]+' "$out" | cut -c1-300 | head -400
fi
# Count leaf test points (indented "ok"/"not ok" lines inside subtests are the asserts).
pass=$(grep -Ec '^\s*ok [0-9]+' "$out")
fail=$(grep -Ec '^\s*not ok [0-9]+' "$out")
grep -E '^# \{ total' "$out" | sed 's/^/phase summary: /'
echo "$pass passed, $fail failed"
[ "$status" = 0 ] && [ "$fail" = 0 ]
