#!/usr/bin/env bash
# Runs the test suites: the Release build (everything; GPU tests skip themselves without a GPU) and the
# sanitizer build (all but [slow]). Shared models and texts are read from $ANTKV_SHARED_DIR, default
# ../shared beside the checkout; ANTKV_NO_SHARED_DATA=1 skips the tests that need them.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
echo "== Release build"
ctest --test-dir build --output-on-failure
echo "== AddressSanitizer + UndefinedBehaviorSanitizer build"
# OpenMP's runtime keeps thread pools alive at exit: leak checking would report them, not our code.
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure
