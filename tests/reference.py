"""What the correctness tests share: transformers' logits and greedy tokens, and the tolerance.

The tolerance is 1e-4 x max(1, max |reference|) on the largest absolute
difference: float32 summation order differs between MAX's kernels and
torch's, nothing else may.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def reference_logits(model, ids: list[int]) -> np.ndarray:
    """transformers' [len(ids), vocab] logits for one token sequence."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def reference_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by full recomputation: no cache, no generate() policies."""
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(reference_logits(model, seq)[-1].argmax()))
    return seq[len(ids):]


def assert_close_to_reference(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    """``got`` equals transformers' ``ref`` within the project's float32 tolerance."""
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, transformers {ref.shape}"
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= tol, f"{what}: logits differ by {err:.3g} (> {tol:.3g})"


def compute_in_float32_layer_by_layer(model, layers, offload_dir) -> None:
    """Make a transformers model loaded in bfloat16 compute exactly as if loaded in float32.

    For a checkpoint stored in bfloat16, loading it with ``dtype=torch.float32``
    only widens every value exactly; so does this, holding at most one of
    ``layers`` (the decoder layers) in memory at a time, as accelerate's disk
    offload would: everything else is widened now; each layer is saved to
    ``offload_dir`` and dropped, and read back widened to float32 right before
    its forward and dropped again right after. The forward then runs
    transformers' own code in float32 on the same values in a fraction of the
    memory (the 235B-A22B cut's two MoE layers hold 18 GiB in float32).
    """
    in_layers = {id(t) for layer in layers for t in (*layer.parameters(), *layer.buffers())}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in in_layers and param.is_floating_point():
                param.data = param.data.float()
        for name, buf in module.named_buffers(recurse=False):
            if id(buf) not in in_layers and buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.float()

    def offload(layer, path) -> None:
        def load(module, args) -> None:
            state = torch.load(path, mmap=True, weights_only=True)
            module.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)

        def drop(module, args, output) -> None:
            module.to("meta")

        torch.save(layer.state_dict(), path)
        layer.to("meta")
        layer.register_forward_pre_hook(load)
        layer.register_forward_hook(drop)

    for i, layer in enumerate(layers):
        offload(layer, Path(offload_dir) / f"layer{i}.pt")
