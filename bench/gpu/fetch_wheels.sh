#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the cp312 manylinux wheels that this package
# needs on a GPU machine of the device tool (python3.12, torch, no MAX, no network), and
# split them into git-ignored folders .mx1 .. .mxN of at most PART_MIB (default 60) MiB
# each, one per `run` call (a run carries at most 64 MiB, the repository included).
# See docs/STATUS.md "GPU run, prepared" and /work/shared/device.md section 3.
#
#   bench/gpu/fetch_wheels.sh          # download + split; prints the carry list per run
#   PART_MIB=58 bench/gpu/fetch_wheels.sh
#
# On the GPU machine, bench/gpu/e2e.sh reassembles the parts (cat .mx*/part-*), checks
# them against SHA256SUMS (in the last part, beside FORMAT) and installs into /tmp/site:
# FORMAT=site (default) untars the site staged and xz-compressed here; FORMAT=wheels
# carries the wheels as they are and runs `pip install --no-index --no-deps --target`.
#
# What is downloaded: MAX 26.7.0 and Mojo 1.2.0 (max, max-core, mojo-compiler and their
# -libs wheels), and every distribution that importing this package, MAX's pipelines
# and its built-in qwen3vl_moe architecture loads (measured here by importing them and
# mapping sys.modules to distributions) which the GPU image lacks (its package list:
# /work/.library/device/KINDS.md), or has at a version MAX/transformers refuse
# (transformers 5.17 there, MAX 26.7 pins <5.13; transformers 5.12.1 pins
# tokenizers<=0.23.0; pydantic needs typing_extensions>=4.16), or has at a version not
# known (protobuf, anyio: carried at the versions MAX's serve extra pins). Versions are those of
# this repository's tested environment (.venv). --no-deps throughout: the list is the
# closure.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
part_mib="${PART_MIB:-60}"
dl="${WHEEL_DIR:-$repo/.mxwheels}"     # the downloaded wheels (git-ignored), kept for reruns
py="${PYTHON:-$repo/.venv/bin/python}"

# MAX and Mojo: the binaries (libmax.so, libMGPRT.so, mojo, lld) and their library wheels.
max_pkgs=(max==26.7.0 max-core==26.7.0 mojo-compiler==1.2.0 max-mojo-libs==26.7.0 max-shmem-libs==26.7.0
          mojo-compiler-mojo-libs==1.2.0)
# Imported at load time by MAX (max.config, max.serve.*, max.pipelines.context.video, the
# weight loaders) or by this package (its server hooks import MAX's serving app), and
# missing on the GPU image or there at a version that does not fit.
dep_pkgs=(msgspec==0.23.0 taskgroup==0.2.2 exceptiongroup==1.3.2
          pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
          typing-inspection==0.4.5 typing-extensions==4.16.0 python-dotenv==1.2.4
          fastapi==0.141.1 starlette==1.10.0 sse-starlette==2.1.3 asgiref==3.13.0 uvicorn==0.55.0
          openai==3.63.0 jiter==0.19.0 httpx2==2.17.0 httpcore2==2.17.0 truststore idna sniffio==1.3.1 distro
          opentelemetry-api==1.35.0 opentelemetry-sdk==1.35.0 opentelemetry-semantic-conventions==0.56b0
          opentelemetry-proto==1.35.0 opentelemetry-exporter-otlp-proto-common==1.35.0
          opentelemetry-exporter-otlp-proto-grpc==1.35.0 opentelemetry-exporter-otlp-proto-http==1.35.0
          opentelemetry-exporter-prometheus==0.56b0 googleapis-common-protos==1.76.0 importlib-metadata==8.7.1
          jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
          pyzmq==27.3.0 python-json-logger==4.2.0 gguf==0.19.0 av==18.1.0
          transformers==5.12.1 tokenizers==0.22.2
          protobuf==6.33.6 anyio==4.16.0)   # MAX serve pins protobuf>=6.33.5 (opentelemetry-proto needs >=5);
                                            # openai needs anyio>=4.10: the image's versions are not known
# Pinning the unpinned few to what the venv has, so reruns fetch the same bytes.
pin() {
  local spec="$1"
  case "$spec" in *==*) echo "$spec"; return;; esac
  local v; v="$("$py" -c "import importlib.metadata as m,sys; print(m.version(sys.argv[1]))" "$spec" 2>/dev/null || true)"
  [ -n "$v" ] && echo "$spec==$v" || echo "$spec"
}
pkgs=()
for p in "${max_pkgs[@]}" "${dep_pkgs[@]}"; do pkgs+=("$(pin "$p")"); done

mkdir -p "$dl"
plat=()
for t in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do plat+=(--platform "$t"); done
echo "downloading ${#pkgs[@]} wheels into $dl ..."
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none "${plat[@]}" -d "$dl" "${pkgs[@]}" 2> >(grep -v "is ignored: it is neither" >&2)

# exactly one wheel per distribution (two versions would stop the install there)
dupes="$(ls "$dl"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
[ -z "$dupes" ] || { echo "more than one wheel of: $dupes (empty $dl and rerun)"; exit 1; }
total=$(du -cb "$dl"/*.whl | tail -1 | cut -f1)
echo "$(ls "$dl"/*.whl | wc -l) wheels, $((total / 1048576)) MiB"

# The parts. FORMAT=wheels: one uncompressed tar of the wheels (zips already), installed
# there with pip. FORMAT=site (default): the wheels installed here into a staging folder
# with pip's cp312 target options (pip install --target --no-deps --no-index, what the GPU
# side would run), tarred and xz-compressed: the binaries (libmax.so, mojo, lld) shrink to
# about a third of their deflated size, so fewer parts and fewer runs; there it is untarred.
format="${FORMAT:-site}"
rm -rf "$repo"/.mx[0-9]* "$repo"/.mxpart-*
if [ "$format" = site ]; then
  stage="$(mktemp -d /tmp/mxstage.XXXXXX)"
  "$py" -m pip install -q --target "$stage/site" --no-deps --no-index --no-compile --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none "${plat[@]}" --platform manylinux_2_26_x86_64 \
    --only-binary=:all: "$dl"/*.whl 2> >(grep -v "is ignored: it is neither" >&2)
  rm -rf "$stage/site/bin"    # console scripts with this machine's interpreter in their shebang
  echo "staged $(du -sm "$stage/site" | cut -f1) MiB; compressing (xz -6, minutes) ..."
  tar -C "$stage/site" -cf - . | nice -n 10 xz -6 -T0 > "$stage/site.tar.xz"
  (cd "$stage" && sha256sum site.tar.xz) > "$stage/SHA256SUMS"
  split -b "${part_mib}m" -d -a 2 "$stage/site.tar.xz" "$repo/.mxpart-"
  echo "site.tar.xz: $(( $(stat -c %s "$stage/site.tar.xz") / 1048576 )) MiB"
else
  (cd "$dl" && sha256sum *.whl) > "$dl/SHA256SUMS.tmp"
  tar -C "$dl" -cf - $(cd "$dl" && ls *.whl) | split -b "${part_mib}m" -d -a 2 - "$repo/.mxpart-"
fi
n=0
for f in "$repo"/.mxpart-*; do
  n=$((n + 1)); mkdir -p "$repo/.mx$n"; mv "$f" "$repo/.mx$n/part-$(printf %02d $n)"
done
if [ "$format" = site ]; then mv "$stage/SHA256SUMS" "$repo/.mx$n/SHA256SUMS"; rm -rf "$stage"
else mv "$dl/SHA256SUMS.tmp" "$repo/.mx$n/SHA256SUMS"; fi
echo "$format" > "$repo/.mx$n/FORMAT"
echo
echo "$n parts (one per run, in order):"
for i in $(seq 1 $n); do
  echo "  run $i: carry [\".mx$i\"]  $(du -b "$repo/.mx$i" | cut -f1 | awk '{printf "%.1f MiB", $1/1048576}')"
done
echo "runs 1..$((n - 1)): command 'ls -la .mx*'; run $n: bench/gpu/e2e.sh (see docs/STATUS.md)"
