"""What the correctness tests share: transformers' logits and greedy tokens, and the tolerance.

The tolerance is 1e-4 x max(1, max |reference|) on the largest absolute
difference: float32 summation order differs between MAX's kernels and
torch's, nothing else may.
"""

from __future__ import annotations

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
