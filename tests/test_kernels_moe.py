"""Tests of the MoE custom ops (mojo_kernels/text) through qwen3vl_moe.kernels.moe.

One module-scoped CPU graph with symbolic T, H, E, I holds every variant under test
(top_k in TOP_KS x {hub, transformers, CPU panels packed by pack_expert_panels} weight
layout x {float32, bfloat16 cast inside the graph, bfloat16 weights under float32
activations (CPU)}) plus the routing outputs, so all hypothesis examples reuse one compiled
model. References:
  * float32: numpy/torch re-implementation of transformers 5.12.1's grouped_mm experts
    path (softmax f32, top-k, renormalise f32, per-expert GEMMs, weight multiply,
    float32 sum over k) -> max|y - ref| <= 1e-5 * max|ref|;
  * bfloat16: the same computation in torch bf16 on bf16-rounded inputs -> <= 2e-2;
  * bfloat16 weights, float32 x: the float32 reference on bf16-rounded weights -> <= 1e-5
    (the conversion is exact, so only the summation order differs);
  * once: transformers' own Qwen3VLMoeTextSparseMoeBlock (grouped_mm and eager).
The GPU paths are compiled (not run) for a virtual cuda/sm_90 device (see
kernel_harness).

Router logits are distinct multiples of 1/4 (exact in bf16), so the top-k never
depends on rounding or tie-breaking.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from max.dtype import DType
from max.graph import DeviceRef, Graph, TensorType, ops

from kernel_harness import GPU_COMPILE_FLAG, assert_gpu_compile, gpu_compile_main, precompile
from qwen3vl_moe.kernels.moe import moe_experts, moe_experts_panels, moe_route, pack_expert_panels

pytestmark = pytest.mark.slow  # every test here runs compiled graphs

F32, BF16 = DType.float32, DType.bfloat16
TOP_KS = (1, 3, 8)          # compile-time parameter of qwen3vl_moe_route: one instantiation each
MIN_E = max(TOP_KS)
LAYOUTS = ("hub", "transformers", "panels")   # panels: CPU only
N_OUT_PER_K = 4 + 3 * len(LAYOUTS)   # ids, weights, perm, offsets, then y f32 / bf16 / mixed per layout


def build_moe_graph(dev: DeviceRef, pkg: Path, top_ks=TOP_KS) -> Graph:
    """Every variant in one graph; symbolic T, H, E, I (and I2 = 2I, checked by the ops)."""
    cpu = dev.is_cpu()
    ins = [
        TensorType(F32, ["T", "H"], dev),          # x
        TensorType(F32, ["T", "E"], dev),          # router logits
        TensorType(F32, ["E", "H", "I2"], dev),    # gate_up, hub layout
        TensorType(F32, ["E", "I", "H"], dev),     # down, hub layout
        TensorType(F32, ["E", "I2", "H"], dev),    # gate_up, transformers layout
        TensorType(F32, ["E", "H", "I"], dev),     # down, transformers layout
    ]
    if cpu:  # panels (pack_expert_panels): float32, and bfloat16 in k-pairs
        ins += [
            TensorType(F32, ["E", "NPg", "H", 64], dev),
            TensorType(F32, ["E", "NPd", "I", 64], dev),
            TensorType(BF16, ["E", "NPg", "Hh", 128], dev),
            TensorType(BF16, ["E", "NPd", "Ih", 128], dev),
        ]
    with Graph("test_moe", input_types=ins, custom_extensions=[pkg]) as g:
        x, logits, gu_hub, dn_hub, gu_tf, dn_tf, *panels = (v.tensor for v in g.inputs)
        weights = {"hub": (gu_hub, dn_hub), "transformers": (gu_tf, dn_tf)}
        b = lambda v: ops.cast(v, BF16)
        weights_bf16 = {lay: (b(gu), b(dn)) for lay, (gu, dn) in weights.items()}
        if cpu:
            weights["panels"], weights_bf16["panels"] = (panels[0], panels[1]), (panels[2], panels[3])
        xb, lb = b(x), b(logits)
        outs = []
        for k in top_ks:
            r = moe_route(logits, top_k=k)
            outs += [r.ids, r.weights, r.perm, r.offsets]
            for lay in weights:
                def experts(x, logits, gu, dn):
                    if lay == "panels":
                        return moe_experts_panels(x, logits, gu, dn, top_k=k, intermediate_size=dn_hub.shape[1])
                    return moe_experts(x, logits, gu, dn, top_k=k, weights_hub_layout=lay == "hub")
                gu, dn = weights[lay]
                outs.append(experts(x, logits, gu, dn))
                gub, dnb = weights_bf16[lay]
                outs.append(ops.cast(experts(xb, lb, gub, dnb), F32))
                if cpu:  # bfloat16 weights under float32 x: a CPU path only
                    outs.append(experts(x, logits, gub, dnb))
        g.output(*outs)
    return g


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def moe_pkg():
    return precompile("text")


@pytest.fixture(scope="module")
def moe_model(moe_pkg):
    from max.driver import CPU
    from max.engine import InferenceSession

    t0 = time.time()
    model = InferenceSession(devices=[CPU()]).load(build_moe_graph(DeviceRef.CPU(), moe_pkg))
    print(f"\nmoe test graph loaded in {time.time() - t0:.1f}s")
    return model


def bf16_bits(a):
    """bfloat16 (round to nearest even, as the graph's cast) as uint16 bit patterns."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def model_inputs(x, logits, gu_hub, dn_hub):
    """The graph's inputs: every layout of the same hub-layout experts."""
    from max.driver import Buffer

    arrays = [x, logits, gu_hub, dn_hub, gu_hub.transpose(0, 2, 1), dn_hub.transpose(0, 2, 1),
              pack_expert_panels(gu_hub, 2, pairs=False), pack_expert_panels(dn_hub, 1, pairs=False)]
    bufs = [Buffer.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    for w, groups in ((gu_hub, 2), (dn_hub, 1)):
        bits = Buffer.from_numpy(pack_expert_panels(bf16_bits(w), groups, pairs=True))
        bufs.append(bits.view(BF16, bits.shape))
    return bufs


def run_model(model, x, logits, gu_hub, dn_hub):
    outs = model.execute(*model_inputs(x, logits, gu_hub, dn_hub))
    res = {}
    for i, k in enumerate(TOP_KS):
        o = [t.to_numpy() for t in outs[i * N_OUT_PER_K:(i + 1) * N_OUT_PER_K]]
        res[k] = {"ids": o[0], "weights": o[1], "perm": o[2], "offsets": o[3]}
        for j, lay in enumerate(LAYOUTS):
            res[k][("y", lay, "f32")] = o[4 + 3 * j]
            res[k][("y", lay, "bf16")] = o[5 + 3 * j]
            res[k][("y", lay, "mixed")] = o[6 + 3 * j]
    return res


# ----------------------------------------------------------------------------- references
def ref_route(logits, top_k, dtype=torch.float32):
    """Router of transformers 5.12.1: (ids [T, k], weights [T, k] in dtype)."""
    p = torch.softmax(torch.from_numpy(logits).to(dtype), dim=-1, dtype=torch.float32)
    tv, ti = torch.topk(p, top_k, dim=-1)
    tv = tv / tv.sum(dim=-1, keepdim=True)
    return ti, tv.to(dtype)


def ref_moe(x, logits, gu_hub, dn_hub, top_k, dtype=torch.float32):
    """transformers 5.12.1 grouped_mm experts path in `dtype` (torch), from hub-layout
    weights; inputs are rounded to `dtype` first. Returns y as float32 numpy."""
    xt = torch.from_numpy(x).to(dtype)
    gu = torch.from_numpy(gu_hub).to(dtype).transpose(1, 2)     # in-memory [E, 2I, H]
    dn = torch.from_numpy(dn_hub).to(dtype).transpose(1, 2)     # in-memory [E, H, I]
    ti, w = ref_route(logits, top_k, dtype)
    T, H = xt.shape
    out = torch.zeros(T, top_k, H, dtype=dtype)
    for e in range(gu.shape[0]):
        tok, kk = torch.where(ti == e)
        if tok.numel() == 0:
            continue
        g, u = torch.nn.functional.linear(xt[tok], gu[e]).chunk(2, dim=-1)
        h = torch.nn.functional.silu(g) * u
        o = torch.nn.functional.linear(h, dn[e])
        out[tok, kk] = o * w[tok, kk, None]
    return out.sum(dim=1).float().numpy()     # float32 accumulation over k, rounded to dtype


def make_logits(rng, T, E, mode):
    """Distinct multiples of 1/4 per row (exact in bf16: no ties, no rounding effects)."""
    base = np.stack([rng.permutation(E) for _ in range(T)]).astype(np.float32) if T else np.zeros((0, E), np.float32)
    if mode == "one_expert":           # every token's top choice is expert 0
        base[:, 0] = E + 1
    elif mode == "empty_expert":       # the last expert is never anyone's choice
        base[:, E - 1] = -4
    return ((base - E / 2) * 0.25).astype(np.float32)


def make_case(seed, T, E, H, I, mode):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    logits = make_logits(rng, T, E, mode)
    gu = (rng.standard_normal((E, H, 2 * I)) / np.sqrt(H)).astype(np.float32)
    dn = (rng.standard_normal((E, I, H)) / np.sqrt(I)).astype(np.float32)
    return x, logits, gu, dn


def rel_err(y, ref):
    if ref.size == 0:
        return 0.0
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def check_routing(r, logits, top_k):
    E = logits.shape[1]
    ids_ref, w_ref = ref_route(logits, top_k)
    np.testing.assert_array_equal(r["ids"], ids_ref.numpy())
    np.testing.assert_allclose(r["weights"], w_ref.numpy(), rtol=2e-6, atol=1e-7)
    ids = r["ids"].reshape(-1)
    off, perm = r["offsets"], r["perm"].reshape(-1)
    np.testing.assert_array_equal(off, np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=E))]))
    np.testing.assert_array_equal(perm, np.argsort(ids, kind="stable"))


def bf16_rounded(a):
    return torch.from_numpy(a).to(torch.bfloat16).float().numpy()


def check_case(model, x, logits, gu, dn):
    res = run_model(model, x, logits, gu, dn)
    for k in TOP_KS:
        r = res[k]
        check_routing(r, logits, k)
        y32 = ref_moe(x, logits, gu, dn, k)
        y16 = ref_moe(x, logits, gu, dn, k, torch.bfloat16)
        ymixed = ref_moe(x, logits, bf16_rounded(gu), bf16_rounded(dn), k)
        for lay in LAYOUTS:
            assert r[("y", lay, "f32")].shape == x.shape
            e32 = rel_err(r[("y", lay, "f32")], y32)
            e16 = rel_err(r[("y", lay, "bf16")], y16)
            emixed = rel_err(r[("y", lay, "mixed")], ymixed)
            assert e32 <= 1e-5, f"f32 top_k={k} {lay}: rel err {e32:.2e}"
            assert e16 <= 2e-2, f"bf16 top_k={k} {lay}: rel err {e16:.2e}"
            assert emixed <= 1e-5, f"bf16 weights, f32 x, top_k={k} {lay}: rel err {emixed:.2e}"
    return res


# ----------------------------------------------------------------------------- tests
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 40),
    E=st.integers(MIN_E, 16),
    H=st.integers(1, 80) | st.integers(128, 300),   # large H: several k-blocks when streaming
    I=st.integers(1, 56),
    mode=st.sampled_from(["random", "one_expert", "empty_expert"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_moe_matches_reference(moe_model, T, E, H, I, mode, seed):
    check_case(moe_model, *make_case(seed, T, E, H, I, mode))


@pytest.mark.parametrize("T,E,H,I,mode", [
    (1, MIN_E, 7, 5, "random"),            # one token
    (200, MIN_E, 70, 40, "one_expert"),    # > one row chunk (96) on one expert, column tails
    (64, 32, 128, 96, "random"),           # several full register tiles in both layouts
    (33, 12, 129, 33, "empty_expert"),
    (3, MIN_E, 300, 130, "random"),        # decode: every expert streams, several k-blocks with a tail
    (20, MIN_E, 257, 70, "one_expert"),    # expert 0 in column panels, the others stream, in one call
    (9, MIN_E, 64, 32, "random"),          # panels: whole panels only; 72 rows at top-8 (no fused combine)
    (8, MIN_E, 63, 31, "one_expert"),      # panels: 64 rows at top-8 (fused combine), one column short
])
def test_moe_edges(moe_model, T, E, H, I, mode):
    res = check_case(moe_model, *make_case(T * 1000 + H, T, E, H, I, mode))
    if mode == "one_expert":
        assert res[1]["offsets"][1] == T                  # all tokens on expert 0
        if T > 8:  # more rows than the hub layout streams: its panel path, bit for bit
            for dt in ("f32", "bf16", "mixed"):
                np.testing.assert_array_equal(res[1][("y", "panels", dt)], res[1][("y", "hub", dt)])
    if mode == "empty_expert":
        for k in TOP_KS:
            off = res[k]["offsets"]
            assert off[-1] == off[-2] == T * k            # last expert owns no row


def test_moe_zero_tokens(moe_model):
    x, logits, gu, dn = make_case(0, 0, MIN_E, 16, 8, "random")
    res = run_model(moe_model, x, logits, gu, dn)
    for k in TOP_KS:
        assert res[k][("y", "hub", "f32")].shape == (0, 16)
        np.testing.assert_array_equal(res[k]["offsets"], np.zeros(MIN_E + 1, np.int32))


def test_moe_rejects_bad_weights(moe_model):
    from max.driver import Buffer

    x, logits, gu, dn = make_case(1, 4, MIN_E, 16, 8, "random")
    bufs = model_inputs(x, logits, gu, dn)
    bad = gu[:, :, :-1]                 # 2I - 1 gate_up columns
    bufs[2], bufs[4] = (Buffer.from_numpy(np.ascontiguousarray(a)) for a in (bad, bad.transpose(0, 2, 1)))
    with pytest.raises(ValueError, match="qwen3vl_moe_gate_up"):
        moe_model.execute(*bufs)
    bufs = model_inputs(x, logits, gu, dn)
    wide = np.concatenate([gu, np.zeros(gu.shape[:2] + (64,), gu.dtype)], axis=2)   # I + 32: one panel too many
    bufs[6] = Buffer.from_numpy(pack_expert_panels(wide, 2, pairs=False))
    bits = Buffer.from_numpy(pack_expert_panels(bf16_bits(wide), 2, pairs=True))   # both (one symbolic dim)
    bufs[8] = bits.view(BF16, bits.shape)
    with pytest.raises(ValueError, match="qwen3vl_moe_gate_up_panels"):
        moe_model.execute(*bufs)


def test_moe_matches_transformers_block(moe_model):
    """transformers' Qwen3VLMoeTextSparseMoeBlock (both experts implementations)."""
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    T, E, H, I, k = 37, 12, 20, 12, 8       # grouped_mm on CPU wants 16-byte strides
    torch.manual_seed(0)
    x = torch.randn(1, T, H)
    for impl in ("grouped_mm", "eager"):
        cfg = Qwen3VLMoeTextConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                   num_experts_per_tok=k, experts_implementation=impl)
        blk = Qwen3VLMoeTextSparseMoeBlock(cfg).eval()
        torch.manual_seed(1)
        for prm in blk.parameters():
            torch.nn.init.normal_(prm, std=0.3)
        with torch.no_grad():
            y_ref = blk(x)[0].numpy()
            logits = torch.nn.functional.linear(x[0], blk.gate.weight).numpy()
        gu_hub = blk.experts.gate_up_proj.detach().transpose(1, 2).contiguous().numpy()
        dn_hub = blk.experts.down_proj.detach().transpose(1, 2).contiguous().numpy()
        res = run_model(moe_model, x[0].numpy(), logits, gu_hub, dn_hub)
        for lay in LAYOUTS:
            err = rel_err(res[k][("y", lay, "f32")], y_ref)
            assert err <= 1e-5, f"{impl} {lay}: rel err {err:.2e}"


def test_gpu_paths_compile_for_sm90():
    """Compile (not run) every MoE op's GPU path for a virtual cuda/sm_90 device."""
    assert_gpu_compile(__file__, precompile("text"), timeout=900)


if __name__ == "__main__" and sys.argv[1:2] == [GPU_COMPILE_FLAG]:
    gpu_compile_main(lambda dev, pkg: build_moe_graph(dev, pkg, top_ks=(8,)))
