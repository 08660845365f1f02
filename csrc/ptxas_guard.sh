#!/bin/sh
# CMake's CUDA compiler launcher (CMakeLists.txt): runs the compile command given as arguments,
# shows its output, and fails the compile -- deleting the object given after `-o` -- when ptxas
# reports "Potential Performance Loss" (e.g. C7510: serialized WGMMA). Such a Hopper kernel is
# correct but loses most of its speed, so it must not reach the library.
# Usage: ptxas_guard.sh <compiler> <arguments...>
log=$(mktemp "${TMPDIR:-/tmp}/knsparse-nvcc.XXXXXX") || exit 1
"$@" >"$log" 2>&1
status=$?
cat "$log"
if [ "$status" -eq 0 ] && grep -q "Potential Performance Loss" "$log"; then
    echo "ptxas_guard: 'Potential Performance Loss' above fails this build" >&2
    object=""
    previous=""
    for arg in "$@"; do
        [ "$previous" = "-o" ] && object=$arg
        previous=$arg
    done
    [ -n "$object" ] && rm -f "$object"
    status=1
fi
rm -f "$log"
exit "$status"
