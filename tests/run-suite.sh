#!/usr/bin/env bash
# Build cbt and run the whole test suite, the way CI does (.ci/run execs
# this script).
#
#   1. tests/install-deps.sh (does nothing when all is installed)
#   2. build       gcc, --werror, debugoptimized       -> meson test
#   3. build-asan  gcc, ASan + UBSan, --werror         -> meson test
#      (both with -Dfault_injection=true: the simulated power cuts)
#   4. build-clang clang, --werror, compile only (keeps clang warning-clean)
#   5. build-fuzz  clang, -Dfuzzing=true, ASan + UBSan, --werror: every
#      libFuzzer target (fuzz/) runs CBT_FUZZ_SECONDS on a copy of its
#      seed corpus; each clean run counts as passed, each crash as failed
#   6. one closing line: "N passed, N failed, N skipped", summed over the
#      test runs and fuzz runs; a failed build step counts as one failure.
#
# Existing build directories are reused (meson setup --reconfigure), so a
# second run only rebuilds what changed.
#
# Environment:
#   CBT_SKIP_ASAN=1   skip the sanitizer build (quick local runs)
#   CBT_SKIP_CLANG=1  skip the clang compile check
#   CBT_SKIP_FUZZ=1   skip the fuzz build and runs
#   CBT_FUZZ_SECONDS  how long each fuzz target runs (default 30)
#   MESON_TEST_ARGS   extra arguments for both `meson test` runs,
#                     e.g. "--suite unit" or a test name
#   ASAN_OPTIONS      default detect_leaks=1:abort_on_error=1
#   UBSAN_OPTIONS     default print_stacktrace=1:halt_on_error=1
# Both sanitizer variables are exported, so the end-to-end shell tests and
# the daemon they start under the ASan build inherit them; meson test keeps
# a value that is already set.
#
# Exit status: 0 only if every build step succeeded and no test failed or
# timed out.

set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
src=$PWD

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

passed=0
failed=0
skipped=0
problems=()

step() { printf '\n=== run-suite: %s\n' "$*"; }

# setup_dir DIR CC ARGS...: configure DIR with compiler CC, or reconfigure
# it with ARGS when it is already a meson build directory (the compiler
# of an existing directory cannot change, so CC is used only the first time).
setup_dir() {
    local dir=$1 cc=$2
    shift 2
    if [[ -f $dir/meson-private/coredata.dat ]]; then
        meson setup --reconfigure "$@" "$dir"
    else
        CC=$cc meson setup "$@" "$dir"
    fi
}

# build DIR CC ARGS...: configure and compile; on failure record it.
build() {
    local dir=$1
    step "configure $dir"
    if ! setup_dir "$@"; then
        problems+=("$dir: meson setup failed (see $src/$dir/meson-logs/meson-log.txt)")
        failed=$((failed + 1))
        return 1
    fi
    step "compile $dir"
    if ! ninja -C "$dir"; then
        problems+=("$dir: compile failed")
        failed=$((failed + 1))
        return 1
    fi
}

# summary_count LOG LABEL: the number meson printed after "LABEL:" in its
# closing summary, or 0 when the line is absent.
summary_count() {
    awk -v label="$2:" '
        index($0, label) == 1 { n = $NF } END { print n + 0 }' "$1"
}

# run_tests DIR: meson test in DIR, then add its summary to the totals.
run_tests() {
    local dir=$1 out rc=0
    out=$(mktemp "${TMPDIR:-/tmp}/cbt-meson-test.XXXXXX")
    step "test $dir (ASAN_OPTIONS=$ASAN_OPTIONS UBSAN_OPTIONS=$UBSAN_OPTIONS)"
    # shellcheck disable=SC2086 # MESON_TEST_ARGS is a list of words
    meson test -C "$dir" --print-errorlogs "${timeout_args[@]}" \
        ${MESON_TEST_ARGS:-} 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}

    local ok xfail fail xpass skip tout
    ok=$(summary_count "$out" "Ok")
    xfail=$(summary_count "$out" "Expected Fail")
    fail=$(summary_count "$out" "Fail")
    xpass=$(summary_count "$out" "Unexpected Pass")
    skip=$(summary_count "$out" "Skipped")
    tout=$(summary_count "$out" "Timeout")
    local had_summary=0
    grep -q '^Ok:' "$out" && had_summary=1
    rm -f "$out"

    passed=$((passed + ok + xfail))
    failed=$((failed + fail + xpass + tout))
    skipped=$((skipped + skip))

    local bad=$((fail + xpass + tout))
    if (( bad > 0 )); then
        problems+=("$dir: $fail failed, $tout timed out, $xpass unexpectedly passed; log: $src/$dir/meson-logs/testlog.txt")
    elif (( rc != 0 )); then
        # meson test failed without counting a failed test (it could not
        # build, or found no summary to print): count it once.
        failed=$((failed + 1))
        problems+=("$dir: meson test exited $rc; log: $src/$dir/meson-logs/testlog.txt")
    elif (( ! had_summary )); then
        echo "run-suite: $dir: meson test printed no summary (no tests defined?)"
    fi
}

# run_fuzzers DIR: run every fuzz target of DIR for CBT_FUZZ_SECONDS on a
# private copy of its seeds (new inputs go there, never into the tree:
# the tree's corpus is the second, read-only directory); a crash leaves
# its reproducer in DIR/fuzz-artifacts/.
run_fuzzers() {
    local dir=$1 secs=${CBT_FUZZ_SECONDS:-30} exe name work rc args
    mkdir -p "$dir/fuzz-artifacts"
    for exe in "$dir"/fuzz/fuzz-*; do
        [[ -f $exe && -x $exe ]] || continue
        name=${exe##*/fuzz-}
        step "fuzz $name for ${secs} s"
        work=$(mktemp -d "${TMPDIR:-/tmp}/cbt-fuzz-$name.XXXXXX")
        args=(-max_total_time="$secs" -timeout=30 -rss_limit_mb=4096
              -artifact_prefix="$src/$dir/fuzz-artifacts/$name-")
        [[ -f fuzz/dict/$name.dict ]] && args+=(-dict="fuzz/dict/$name.dict")
        rc=0
        timeout $((secs + 120)) "$exe" "${args[@]}" "$work" "fuzz/corpus/$name" \
            >"$work.log" 2>&1 || rc=$?
        grep -E '^#[0-9]+.*DONE' "$work.log" | tail -n 1
        if (( rc == 0 )); then
            passed=$((passed + 1))
            rm -f "$work.log"
        else
            tail -n 40 "$work.log"
            mv "$work.log" "$dir/fuzz-artifacts/$name.log"
            failed=$((failed + 1))
            problems+=("fuzz-$name: exited $rc; log and reproducer in $src/$dir/fuzz-artifacts/")
        fi
        rm -rf "$work"
    done
}

step "install dependencies"
if ! bash tests/install-deps.sh; then
    echo "run-suite: tests/install-deps.sh failed" >&2
    echo "0 passed, 1 failed, 0 skipped"
    exit 1
fi

timeout_args=()
if build build gcc --werror -Dbuildtype=debugoptimized -Dfault_injection=true; then
    run_tests build
fi

if [[ ${CBT_SKIP_ASAN:-} == 1 ]]; then
    step "skip build-asan (CBT_SKIP_ASAN=1)"
else
    # Sanitized code runs a few times slower; give each test more time.
    timeout_args=(--timeout-multiplier 3)
    if build build-asan gcc --werror -Dbuildtype=debug -Dfault_injection=true \
             -Db_sanitize=address,undefined -Db_lundef=false; then
        run_tests build-asan
    fi
    timeout_args=()
fi

if [[ ${CBT_SKIP_CLANG:-} == 1 ]]; then
    step "skip build-clang (CBT_SKIP_CLANG=1)"
else
    build build-clang clang --werror -Dbuildtype=debugoptimized -Dfault_injection=true || true
fi

if [[ ${CBT_SKIP_FUZZ:-} == 1 ]]; then
    step "skip build-fuzz (CBT_SKIP_FUZZ=1)"
elif build build-fuzz clang --werror -Dbuildtype=debugoptimized -Dfuzzing=true \
           -Db_sanitize=address,undefined -Db_lundef=false -Dtests=false; then
    run_fuzzers build-fuzz
fi

step "summary"
for p in "${problems[@]}"; do
    echo "run-suite: FAILED: $p"
done
echo "$passed passed, $failed failed, $skipped skipped"
(( failed == 0 ))
