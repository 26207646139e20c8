"""model=linear is a softmax regression on per-clip functionals; data.face_transform=logodds is a
fixed, data-free map of the face numbers (the DP recipe of +experiment=ravdess_av_dp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedmer.config import ConfigError, DataConfig, ModelConfig
from fedmer.data.ravdess import transform_face
from fedmer.models import build_model

SLICES = ((0, 5), (5, 8))
C = 4


def _linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder="functionals_linear", fusion="sum"), SLICES, C)


def test_it_is_one_linear_map_of_the_functionals_of_the_present_modalities() -> None:
    model = _linear()
    assert sum(p.numel() for p in model.parameters()) == (2 * 5 + 1) * C + (2 * 3 + 1) * C
    x = torch.randn(6, 7, 8)
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.float32)
    x[mask[:, 1] == 0, :, 5:] = 0.0
    x[mask[:, 0] == 0, :, :5] = 0.0
    logits = model(x, mask)
    expected = torch.zeros(6, C)
    for m, (a, b) in enumerate(SLICES):
        seg = x[:, :, a:b]
        feats = torch.cat([seg.mean(1), torch.sqrt(seg.var(1, unbiased=False) + 1e-6)], dim=1)
        expected += mask[:, m : m + 1] * model.encoders[m].proj(feats)
    torch.testing.assert_close(logits, expected)


def test_sum_fusion_refuses_embeddings_that_are_not_logits() -> None:
    from fedmer.models.fusion import SumFusion

    with pytest.raises(ValueError, match="width 4"):
        SumFusion(2, 16, 4)


@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=30))
def test_logodds_is_finite_increasing_and_symmetric(values: list[float]) -> None:
    q = np.sort(np.array(values, dtype=np.float32))
    z = transform_face(q, "logodds")
    assert np.isfinite(z).all() and z.dtype == np.float32
    assert (np.diff(z) >= 0).all()
    np.testing.assert_allclose(transform_face(1.0 - q, "logodds"), -z, atol=1e-5)
    assert transform_face(q, "none") is q


def test_face_transform_is_validated_and_ravdess_only() -> None:
    with pytest.raises(ConfigError, match=r"data\.face_transform='logit'.*none.*logodds"):
        DataConfig(name="ravdess", face_transform="logit")
    with pytest.raises(ConfigError, match=r"data\.face_transform='logodds'.*only RAVDESS"):
        DataConfig(name="synthetic", face_transform="logodds")
