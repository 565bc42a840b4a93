"""The custom-op names: every op registered in mojo_kernels/ carries the package's
``qwen3vl_`` prefix (MAX custom ops share one namespace with every other
extension a graph lists), and every name the Python wrappers pass to
``ops.custom`` is one that a Mojo package registers. Reads the sources; compiles nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwen3vl_moe.kernels import attention, linear, moe, paged_attention, qkv, vision

KERNELS = Path(__file__).resolve().parents[1] / "mojo_kernels"
REGISTER = re.compile(r'@extensibility\.register\("([^"]+)"\)')
SHAPE_FUNCTION = re.compile(r'@extensibility\.register_shape_function\("([^"]+)"\)')


def registered(pattern: re.Pattern) -> list[str]:
    return [m for src in sorted(KERNELS.rglob("*.mojo")) for m in pattern.findall(src.read_text())]


def test_every_op_is_prefixed_and_unique():
    names = registered(REGISTER)
    assert len(names) == 10, names
    assert all(n.startswith("qwen3vl_") for n in names), names
    assert len(set(names)) == len(names), names


def test_shape_functions_belong_to_registered_ops():
    assert set(registered(SHAPE_FUNCTION)) <= set(registered(REGISTER))


def test_python_wrappers_call_registered_ops():
    used = {moe.ROUTE_OP, moe.GATE_UP_OP, moe.DOWN_OP, moe.GATE_UP_PANELS_OP, moe.DOWN_PANELS_OP,
            linear.LINEAR_OP, attention.ATTENTION_OP, vision.POS_EMBED_OP, qkv.QKV_OP,
            paged_attention.PAGED_ATTENTION_OP}
    assert used == set(registered(REGISTER))


CONTIGUITY_PROGRAM = """
from std.utils import IndexList
from text.contiguity import require_contiguous


def check[rank: Int](shape: IndexList[rank], strides: IndexList[rank]):
    try:
        require_contiguous("qwen3vl_test_op", "x", shape, strides)
        print("ok")
    except e:
        print(e)


def main():
    check(IndexList[2](3, 4), IndexList[2](4, 1))           # dense
    check(IndexList[2](3, 4), IndexList[2](1, 3))           # transposed view
    check(IndexList[3](2, 1, 5), IndexList[3](5, 99, 1))    # size-1 dim: stride ignored
    check(IndexList[3](2, 3, 4), IndexList[3](24, 4, 1))    # padded rows
    check(IndexList[1](7), IndexList[1](2))                 # strided vector
"""


def test_contiguity_check_rejects_strided_tensors(tmp_path):
    """The text ops' input check (mojo_kernels/text/contiguity.mojo), run on shape/stride pairs
    that MAX graphs do not produce today (their tensors are dense) but a strided view would."""
    import os
    import subprocess
    import sys

    prog = tmp_path / "contiguity_check.mojo"
    prog.write_text(CONTIGUITY_PROGRAM)
    mojo = Path(sys.executable).parent / "mojo"
    r = subprocess.run([str(mojo), "run", "-I", str(KERNELS), str(prog)], capture_output=True, text=True,
                       env=dict(os.environ), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    bad = "qwen3vl_test_op: x must be contiguous (dense row-major)"
    assert r.stdout.split("\n")[:5] == ["ok", bad, "ok", bad, bad], r.stdout
