#!/usr/bin/env bash
# Run every GPU check binary built by bench/gpu/build.sh and print a summary table last.
# Works from the repository (bench/gpu/run.sh) or from a copy of bench/gpu/build/
# alone (build.sh puts this script in there too): it looks for check_* binaries next
# to itself, else in ./build/ beside it.
#
#   bench/gpu/run.sh            # all checks
#   bench/gpu/run.sh moe        # only check_moe
#
# Needs an NVIDIA GPU (sm_90 build by default). Logs: <build>/logs/<check>.log
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if compgen -G "$here/check_*" > /dev/null && [ ! -f "$here/build.sh" ]; then
  bin="$here"
else
  bin="$here/build"
fi
export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p "$bin/logs"

names=()
if [ $# -gt 0 ]; then
  for n in "$@"; do names+=("check_${n#check_}"); done
else
  for f in "$bin"/check_*; do
    [ -x "$f" ] && [ -f "$f" ] && names+=("$(basename "$f")")
  done
fi
[ ${#names[@]} -gt 0 ] || { echo "no check binaries in $bin (run bench/gpu/build.sh first)"; exit 2; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
status=0
declare -A rc_of secs_of
for name in "${names[@]}"; do
  echo "================ $name"
  t0=$(date +%s)
  "$bin/$name" 2>&1 | tee "$bin/logs/$name.log"
  rc=${PIPESTATUS[0]}
  rc_of[$name]=$rc
  secs_of[$name]=$(( $(date +%s) - t0 ))
  [ "$rc" = 0 ] || status=1
done

echo
echo "================ summary"
for name in "${names[@]}"; do
  echo "---- $name (exit ${rc_of[$name]}, ${secs_of[$name]} s)"
  # everything after the check's last "== summary ==" line, else its last 5 lines
  if grep -q '^== summary ==' "$bin/logs/$name.log"; then
    awk '/^== summary ==/{buf=""; on=1; next} on{buf=buf $0 "\n"} END{printf "%s", buf}' "$bin/logs/$name.log"
  else
    tail -n 5 "$bin/logs/$name.log"
  fi
  grep -q ": FAIL" "$bin/logs/$name.log" && status=1
done
exit $status
