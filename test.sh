#!/usr/bin/env bash
# Builds (scripts/setup.sh) and runs the test suite; ends with one "N passed, N failed" line.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
./scripts/setup.sh || exit 1
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$(nproc)}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
results="$(mktemp -d)"
echo "[test] dotnet test -c Release" >&2
dotnet test tests/LlmSnp.Tests -c Release --no-build --logger "trx;LogFileName=results.trx" --results-directory "$results" "$@"
rc=$?
trx="$results/results.trx"
if [ -f "$trx" ]; then
  passed=$(grep -o 'passed="[0-9]*"' "$trx" | head -1 | tr -dc 0-9)
  failed=$(grep -o 'failed="[0-9]*"' "$trx" | head -1 | tr -dc 0-9)
  echo "${passed:-0} passed, ${failed:-0} failed"
fi
rm -rf "$results"
exit $rc
