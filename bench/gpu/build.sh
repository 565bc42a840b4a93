#!/usr/bin/env bash
# Build every GPU check binary bench/gpu/check_*.mojo for sm_90 (no GPU needed) into
# bench/gpu/build/, next to the Mojo runtime libraries they load, so that the folder
# can be copied to a GPU machine without MAX and run there with bench/gpu/run.sh.
#
#   bench/gpu/build.sh              # all checks
#   bench/gpu/build.sh moe          # only check_moe.mojo (names without check_ / .mojo)
#   ARCH=sm_80 bench/gpu/build.sh   # another NVIDIA target
#
# Each check is a host `main` that imports the kernel packages under mojo_kernels/
# (e.g. `from text.gpu_moe import ...`), checks the GPU results against a CPU
# reference, times the kernels and ends its output with a line "== summary ==" followed
# by a short table and "<check>: PASS|FAIL" (run.sh prints those parts last).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${VENV:-/work/venv}"
mojo="${MOJO:-$venv/bin/mojo}"
arch="${ARCH:-sm_90}"
out="$here/build"
mkdir -p "$out"
printf '*\n' > "$out/.gitignore"     # build outputs never get committed

libdir="$("$venv/bin/python" -c 'import modular, os; print(os.path.join(os.path.dirname(modular.__file__), "lib"))' 2>/dev/null \
          || echo "$venv/lib/python3.11/site-packages/modular/lib")"

checks=()
if [ $# -gt 0 ]; then
  for n in "$@"; do checks+=("$here/check_${n#check_}.mojo"); done
else
  checks=("$here"/check_*.mojo)
fi

for src in "${checks[@]}"; do
  name="$(basename "$src" .mojo)"
  echo "building $name for $arch ..."
  t0=$(date +%s)
  "$mojo" build -I "$repo/mojo_kernels" --target-accelerator="$arch" "$src" -o "$out/$name"
  echo "  -> $out/$name ($(( $(date +%s) - t0 )) s)"
done

# runtime libraries: the four the binaries link (see `ldd`), and libMGPRT.so, which the
# GPU runtime loads at run time (set NO_MGPRT=1 to leave the 45 MB out)
libs=(libKGENCompilerRTShared.so libAsyncRTMojoBindings.so libMSupportGlobals.so libAsyncRTRuntimeGlobals.so)
[ "${NO_MGPRT:-0}" = 1 ] || libs+=(libMGPRT.so)
for l in "${libs[@]}"; do
  cp -u "$libdir/$l" "$out/"
done
cp -u "$here/run.sh" "$out/run.sh"
du -sh "$out"
