"""Update clipping: what leaves a client is within norm C, and small updates pass unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.privacy.clipping import clip_update, update_norm


def _states(seed: int, scale: float) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    old = {"a": torch.randn(7, 3, generator=g), "b": torch.randn(5, generator=g), "n": torch.tensor(3)}
    new = {
        k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1)
        for k, v in old.items()
    }
    return new, old


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-4, 1e3), clip=st.floats(1e-3, 50.0))
def test_clipped_update_norm_is_at_most_c(seed: int, scale: float, clip: float) -> None:
    new, old = _states(seed, scale)
    clipped, norm, was_clipped = clip_update(new, old, clip)
    assert update_norm(clipped, old) <= clip
    assert norm == pytest.approx(update_norm(new, old))
    assert was_clipped == (norm > clip)
    if not was_clipped:
        for k in new:
            assert torch.equal(clipped[k], new[k])
    else:  # direction kept: clipped delta is a positive multiple of the raw delta
        d_new = np.concatenate([(new[k] - old[k]).flatten().numpy() for k in ("a", "b")])
        d_cl = np.concatenate([(clipped[k] - old[k]).flatten().numpy() for k in ("a", "b")])
        cos = d_new @ d_cl / (np.linalg.norm(d_new) * np.linalg.norm(d_cl))
        assert cos == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(clipped["n"], new["n"])  # integer buffers pass through


def test_non_finite_update_is_refused() -> None:
    new, old = _states(0, 1.0)
    new["a"][0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="non-finite"):
        clip_update(new, old, 1.0)


def test_bad_clip_norm_and_mismatched_keys() -> None:
    new, old = _states(0, 1.0)
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        clip_update(new, old, 0.0)
    with pytest.raises(ValueError, match="differ in keys"):
        clip_update({**new, "extra": torch.zeros(1)}, old, 1.0)
