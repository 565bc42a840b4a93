"""What the Mojo kernel tests share: precompiled packages and the sm_90 compile check.

Each kernel test module builds one graph with all its op variants (symbolic
dims), loads it once on CPU, and checks that the same graph compiles for a
virtual cuda/sm_90 device. Virtual device mode must be set before any device
exists in a process, so that check runs the test module itself in a child
process (``python test_x.py --gpu-compile PACKAGE.mojoc``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from qwen3vl_moe.kernels import kernel_package

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / ".build"
GPU_COMPILE_FLAG = "--gpu-compile"
GPU_COMPILE_OK = "GPU COMPILE OK"


def hypothesis_settings():
    """25 derandomized examples, no deadline (examples share one compiled model)."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        derandomize=True,
    )


def precompile(package: str, name: str | None = None) -> Path:
    """`mojo precompile` one package to a stable ``.build/<name>.mojoc``.

    The file name is part of MAX's cache key: a stable name keeps later runs
    cached, a new one costs a cold compile.
    """
    out = BUILD / f"{name or package + '_kernels'}.mojoc"
    out.parent.mkdir(parents=True, exist_ok=True)
    mojo = Path(sys.executable).parent / "mojo"
    # env=os.environ: importing max.pipelines setenv()s PYTHONEXECUTABLE to the pyenv
    # shim at C level, which makes a plain child `mojo` miss the venv.
    subprocess.run([str(mojo), "precompile", str(kernel_package(package)), "-o", str(out)],
                   check=True, capture_output=True, env=dict(os.environ))
    return out


def load_on_cpu(build_graph: Callable[[object, Path], object], package: str):
    """Precompiles ``package`` and loads ``build_graph(DeviceRef.CPU(), pkg)`` on the host."""
    from max.driver import CPU
    from max.engine import InferenceSession
    from max.graph import DeviceRef

    return InferenceSession(devices=[CPU()]).load(build_graph(DeviceRef.CPU(), precompile(package)))


def run_numpy(model, *arrays) -> list:
    """Executes ``model`` on numpy arrays (made contiguous); numpy outputs."""
    import numpy as np
    from max.driver import Buffer

    return [o.to_numpy() for o in model.execute(*[Buffer.from_numpy(np.ascontiguousarray(a)) for a in arrays])]


def assert_gpu_compile(test_file: str, package: Path, timeout: int = 1200) -> None:
    """Runs ``test_file --gpu-compile package`` and asserts it compiled."""
    r = subprocess.run([sys.executable, test_file, GPU_COMPILE_FLAG, str(package)], capture_output=True,
                       text=True, env=dict(os.environ), timeout=timeout, cwd=REPO)
    assert r.returncode == 0 and GPU_COMPILE_OK in r.stdout, (r.stdout + r.stderr)[-6000:]


def gpu_compile_main(build_graph: Callable[[object, Path], object], api: str = "cuda", arch: str = "sm_90") -> None:
    """The child side: compile (not load: that needs a real GPU) ``build_graph(DeviceRef.GPU(), pkg)``."""
    from max import driver

    driver.set_virtual_device_api(api)
    driver.set_virtual_device_target_arch(arch)
    driver.set_virtual_device_count(1)     # before any device object exists
    from max.driver import CPU, Accelerator
    from max.engine import InferenceSession
    from max.graph import DeviceRef

    gpu = Accelerator()
    assert driver.is_virtual_device_mode()
    graph = build_graph(DeviceRef.GPU(), Path(sys.argv[2]))
    t0 = time.time()
    session = InferenceSession(devices=[CPU(), gpu])
    session.compile(graph)
    del session  # before interpreter teardown: with it alive at exit MAX 26.7 aborts (std::terminate)
    print(f"{GPU_COMPILE_OK} {api}/{arch} in {time.time() - t0:.1f}s")
