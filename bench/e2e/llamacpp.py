"""llama.cpp as a contender: its tools built (or reused), the checkpoint converted to GGUF, its own benchmarks run.

Build: the llama-cpp-python sdist from PyPI carries the whole llama.cpp tree
(``vendor/llama.cpp``, converter and ``gguf-py`` included). On first use it is
downloaded with pip and built with cmake + ninja (CPU, ``GGML_NATIVE``) into
``$QWEN3VL_MOE_CACHE/llama.cpp/build``, which takes about half an hour on two
busy cores. ``--llama-build DIR`` / ``$QWEN3VL_LLAMA_BUILD`` point at an
existing build directory instead (its CMakeCache names the source tree); such
a directory is used as it is, never built.

Conversion: llama.cpp's ``convert_hf_to_gguf.py``, text weights in F32, F16
or Q8_0 and the vision projector (mmproj) in F32, cached by checkpoint
content. The tiny checkpoints' tokenizer is unknown to the converter's
pre-tokenizer hash table; when its pre-tokenizer regex is Qwen2's, the
conversion subprocess maps the unknown hash to ``qwen2`` (the vendored
sources are not touched).

Timing: each timed call starts the tool (``llama-bench``,
``llama-batched-bench``, ``llama-mtmd-cli``) and reads the time it reports
itself, so process start and model load are not counted. Peak RSS is read
from a small wrapper process's ``RUSAGE_CHILDREN`` (a child forked from the
driver itself would inherit the driver's high-water mark).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-mtmd-cli")
WEIGHT_TYPES = ("f32", "f16", "q8_0")
# Qwen2's pre-tokenizer split (tokenizer.json of the Qwen2/2.5/3 families),
# which llama.cpp implements as the pre-tokenizer "qwen2".
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Runs argv[2:], then writes the child's peak RSS (KiB) to argv[1].
_RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
                "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
                "sys.exit(rc)")

# The converter, with an unknown pre-tokenizer hash mapped to qwen2 when argv[2] is "qwen2".
_CONVERT = """
import runpy, sys
src, pre, model_dir, *args = sys.argv[1:]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
recognised = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return recognised(self, tokenizer)
    except NotImplementedError:
        if pre == "qwen2":
            print("pre-tokenizer hash unknown; the tokenizer splits as Qwen2's: using 'qwen2'", file=sys.stderr)
            return "qwen2"
        raise
TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [src + "/convert_hf_to_gguf.py", model_dir, *args]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# A chat template that renders the messages' text as it is (for llama-mtmd-cli's chat mode).
_RAW_TEMPLATE = "{%- for message in messages %}{{ message['content'] }}{%- endfor %}"


def cache_root() -> Path:
    from qwen3vl_moe.cache import cache_root as package_cache_root

    return package_cache_root() / "llama.cpp"


def _run(cmd: list[str], log: Path, **kwargs: Any) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join("<script>" if "\n" in a else a for a in cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, **kwargs)
    if rc:
        raise RuntimeError(f"{cmd[0]} failed (rc {rc}); log {log}:\n"
                           + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))


@dataclass
class LlamaCpp:
    """A llama.cpp build directory with the tools in ``bin/`` and the source tree it was configured from."""

    build_dir: Path
    source_dir: Path

    @classmethod
    def locate(cls, build_dir: str | None, say: Any = print) -> LlamaCpp:
        """The given build directory (used as it is), else the cache's, built on first use."""
        given = build_dir or os.environ.get("QWEN3VL_LLAMA_BUILD")
        if given:
            found = cls._from_build(Path(given).expanduser().resolve())
            missing = [t for t in TOOLS if not (found.build_dir / "bin" / t).exists()]
            if missing:
                raise FileNotFoundError(
                    f"llama.cpp build {found.build_dir} lacks {', '.join(missing)} in bin/ (still building? "
                    f"else: cmake --build {found.build_dir} --target {' '.join(TOOLS)})")
            return found
        return cls._cached(cache_root(), say)

    @classmethod
    def _from_build(cls, build_dir: Path) -> LlamaCpp:
        cache = build_dir / "CMakeCache.txt"
        if not cache.exists():
            raise FileNotFoundError(f"{build_dir} is not a configured llama.cpp build (no CMakeCache.txt)")
        match = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache.read_text(), re.MULTILINE)
        if not match or not (Path(match.group(1)) / "convert_hf_to_gguf.py").exists():
            raise FileNotFoundError(f"{cache} names no llama.cpp source tree with convert_hf_to_gguf.py")
        return cls(build_dir, Path(match.group(1)))

    @classmethod
    def _cached(cls, root: Path, say: Any) -> LlamaCpp:
        build = root / "build"
        if all((build / "bin" / t).exists() for t in TOOLS):
            return cls._from_build(build)
        root.mkdir(parents=True, exist_ok=True)
        log = root / "build.log"
        source = next(root.glob("src/llama_cpp_python-*/vendor/llama.cpp"), None)
        if source is None:
            say(f"downloading the {SDIST} sdist (the llama.cpp sources) ...")
            _run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:",
                  "-d", str(root / "sdist")], log)
            archive = next((root / "sdist").glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(root / "src", filter="data")
            source = next(root.glob("src/llama_cpp_python-*/vendor/llama.cpp"))
        say(f"building llama.cpp ({', '.join(TOOLS)}; about 30 min on 2 cores; log {log}) ...")
        _run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
              "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"], log)
        _run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1), "--target", *TOOLS], log)
        return cls._from_build(build)

    def tool(self, name: str) -> str:
        return str(self.build_dir / "bin" / name)

    def describe(self) -> dict[str, Any]:
        cache = (self.build_dir / "CMakeCache.txt").read_text()
        flags = {k: v for k, v in re.findall(r"^(GGML_NATIVE|GGML_AVX\w*|CMAKE_BUILD_TYPE):\w+=(.*)$", cache,
                                              re.MULTILINE)}
        return {"build_dir": str(self.build_dir), "source_dir": str(self.source_dir), "cmake": flags}

    # ------------------------------------------------------------------ conversion
    def gguf(self, model_path: Path, weight_type: str, log: Path, mmproj: bool = False) -> Path:
        """The checkpoint as GGUF (text weights, or with ``mmproj`` the vision projector), converted once."""
        out_dir = cache_root() / "gguf" / f"{model_path.name}-{_content_key(model_path)}"
        out = out_dir / (f"mmproj-{weight_type}.gguf" if mmproj else f"text-{weight_type}.gguf")
        if out.exists():
            return out
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        pre = "qwen2" if _split_regex(model_path) == QWEN2_SPLIT else "-"
        _run([sys.executable, "-c", _CONVERT, str(self.source_dir), pre, str(model_path),
              "--outfile", str(partial), "--outtype", weight_type, *(["--mmproj"] if mmproj else [])], log)
        partial.rename(out)
        return out

    # ------------------------------------------------------------------ runs
    def run_tool(self, name: str, args: list[str], log_dir: Path, tag: str,
                 stdin: str | None = None) -> tuple[str, str, int]:
        """Runs a tool; returns its stdout, stderr and peak RSS (bytes)."""
        rss_file = log_dir / f"{tag}.rss"
        out = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, str(rss_file), self.tool(name), *args],
                             input=stdin if stdin is not None else "", capture_output=True,
                             text=True, errors="replace", check=False)
        (log_dir / f"{tag}.log").write_text(f"$ {name} {' '.join(args)}\n{out.stdout}\n--- stderr\n{out.stderr}")
        if out.returncode:
            raise RuntimeError(f"{name} failed (rc {out.returncode}); log {log_dir / (tag + '.log')}:\n"
                               + "\n".join(out.stderr.splitlines()[-20:]))
        return out.stdout, out.stderr, int(rss_file.read_text()) * 1024


def _content_key(model_path: Path) -> str:
    """A short hash of the checkpoint's config and weight files (name, size, mtime)."""
    h = hashlib.sha256((model_path / "config.json").read_bytes())
    for f in sorted(model_path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _split_regex(model_path: Path) -> str | None:
    """The regex of the checkpoint tokenizer's Split pre-tokenizer, if it has one."""
    try:
        pre = json.loads((model_path / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return None
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Split":
            return (step.get("pattern") or {}).get("Regex")
    return None


@dataclass
class LlamaContender:
    """One llama.cpp weight type: the ops of the benchmark, each one run of llama.cpp's own tool."""

    llama: LlamaCpp
    weight_type: str
    text_gguf: Path
    mmproj_gguf: Path | None
    spec: dict[str, Any]
    log_dir: Path
    rss: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    calls: int = 0

    @property
    def name(self) -> str:
        return f"llama:{self.weight_type}"

    def _tool(self, tool: str, args: list[str], stdin: str | None = None) -> tuple[str, str]:
        self.calls += 1
        stdout, stderr, rss = self.llama.run_tool(tool, args, self.log_dir,
                                                  f"{self.name.replace(':', '-')}-{self.calls:03d}-{tool}", stdin)
        self.rss[tool] = max(self.rss.get(tool, 0), rss)
        return stdout, stderr

    @property
    def peak_rss_bytes(self) -> int:
        return max(self.rss.values())

    def _threads(self) -> list[str]:
        return ["-t", str(self.spec["threads"])]

    def _kv(self) -> list[str]:
        return ["-ctk", self.spec["kv_type"], "-ctv", self.spec["kv_type"]]

    def _no_repack(self) -> list[str]:
        """llama.cpp's flag that keeps weights in plain CPU buffers (no repacked or AMX layouts), if asked for."""
        return [] if self.spec["repack"] else ["--no-repack"]

    def run(self, bench: str) -> dict[str, Any]:
        return {"long": self.long, "batch": self.batch, "vision": self.vision}[bench]()

    def _llama_bench(self, args: list[str]) -> dict[str, Any]:
        stdout, _ = self._tool("llama-bench", ["-m", str(self.text_gguf), *self._threads(), *self._kv(),
                                               "--repack", str(int(self.spec["repack"])), "-r", "1", "-o", "json",
                                               *args])
        [result] = json.loads(stdout)
        self.info.setdefault("llama-bench", {k: result.get(k) for k in (
            "build_commit", "build_number", "cpu_info", "backends", "n_threads", "type_k", "type_v",
            "flash_attn", "n_batch", "n_ubatch", "model_type", "model_size", "model_n_params", "use_mmap")})
        return result

    def long(self) -> dict[str, Any]:
        """Prefill of a ``prompt_len`` prompt, then decode at batch 1 after a prompt that long (``-d``)."""
        P, N = self.spec["prompt_len"], self.spec["new_tokens"]
        pp = self._llama_bench(["-p", str(P), "-n", "0"])
        tg = self._llama_bench(["-p", "0", "-n", str(N), "-d", str(P)])
        return {"prefill_s": pp["avg_ns"] / 1e9, "decode_tok_s": tg["avg_ts"],
                "step_ms": tg["avg_ns"] / 1e6 / N, "decode_tokens": N}

    def batch(self) -> dict[str, Any]:
        """``batch`` sequences of ``batch_prompt_len`` tokens, then ``new_tokens`` steps of ``batch`` tokens."""
        B, P, N = self.spec["batch"], self.spec["batch_prompt_len"], self.spec["new_tokens"]
        stdout, _ = self._tool("llama-batched-bench", [
            "-m", str(self.text_gguf), *self._threads(), "-tb", str(self.spec["threads"]), *self._kv(),
            *self._no_repack(),
            "-c", str(B * (P + N)), "-b", "2048", "-ub", "512", "-npp", str(P), "-ntg", str(N), "-npl", str(B),
            "--output-format", "jsonl"])
        rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        if len(rows) != 1:
            raise RuntimeError(f"llama-batched-bench printed {len(rows)} result rows, expected 1")
        row = rows[0]
        self.info.setdefault("llama-batched-bench", {k: row[k] for k in (
            "n_kv_max", "n_batch", "n_ubatch", "flash_attn", "is_pp_shared", "n_threads")})
        return {"decode_tok_s": row["speed_tg"], "step_ms": 1e3 * row["t_tg"] / N, "decode_tokens": B * N}

    def vision(self) -> dict[str, Any]:
        """The image encoder's time for the benchmark image, as ``llama-mtmd-cli`` logs it (F32 mmproj)."""
        if self.mmproj_gguf is None:
            return {"s": float("nan"), "patches": None, "merged_tokens": None}
        _, stderr = self._tool("llama-mtmd-cli", [
            "-m", str(self.text_gguf), "--mmproj", str(self.mmproj_gguf), *self._threads(), *self._no_repack(),
            "--image", self.spec["image_path"], "-p", "Describe the image.", "-n", "1", "--temp", "0",
            "-c", "2048"])
        return {"s": parse_encode_ms(stderr) / 1e3, "patches": None, "merged_tokens": None}

    def greedy_text(self, text: str, new_tokens: int) -> str:
        """Greedy continuation of plain ``text`` (``llama-mtmd-cli`` chat mode with a pass-through template).

        The CLI's echo of the typed line races with its own output and can land
        inside it (seen once in three runs); such a run is repeated, up to 3 times.
        """
        for attempt in range(3):
            stdout, _ = self._tool("llama-mtmd-cli", [
                "-m", str(self.text_gguf), "--mmproj", str(self.mmproj_gguf), *self._threads(), *self._no_repack(),
                "-n", str(new_tokens), "--temp", "0", "--top-k", "1", "--seed", "0", "-c", "512",
                "--jinja", "--chat-template", _RAW_TEMPLATE], stdin=text + "\n")
            try:
                return parse_chat_reply(stdout, text)
            except RuntimeError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def parse_encode_ms(log: str) -> float:
    """The image encoder's time: the sum of ``llama-mtmd-cli``'s "mtmd batch encoding done in N ms" lines.

    (Builds whose CLI encodes through ``mtmd_helper`` log "image slice
    encoded in N ms" per slice instead; both time ``mtmd_*encode*`` alone.)
    """
    times = [float(m) for m in re.findall(r"(?:mtmd batch encoding done|image slice encoded) in (\d+) ms", log)]
    if not times:
        raise RuntimeError("llama-mtmd-cli logged no 'mtmd batch encoding done in N ms' line")
    return sum(times)


def parse_chat_reply(stdout: str, prompt: str) -> str:
    """The model's reply in ``llama-mtmd-cli`` chat mode: what follows the prompt, up to the next prompt marker.

    The CLI prints "\\n> ", reads the prompt, prints "\\n" once it is
    evaluated, then the reply, then "\\n" if the reply ended at an
    end-of-generation token (not after ``-n`` tokens), then "\\n> ". Its console
    also echoes the typed line ("prompt\\n") straight to stdout while the
    CLI's own output goes through a logging thread, so the echo lands anywhere
    before the reply: it is removed first.
    """
    parts = stdout.replace(prompt + "\n", "", 1).split("\n> ")
    if len(parts) < 3 or not parts[1].startswith("\n"):
        raise RuntimeError(f"unexpected llama-mtmd-cli chat output: {stdout[-500:]!r}")
    return "\n> ".join(parts[1:-1])[1:]
