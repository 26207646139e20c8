"""Auxiliary objectives: per-sample decomposable (what DP-SGD needs) and computing what they claim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.config import ConfigError, ModelConfig
from fedmer.models import CCAAlignment, PrototypeContrastive, build_aux_objective, build_model
from fedmer.models.objectives import intensity_loss

H, C = 8, 3


def _objective(name: str, m: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_aux_objective(name, m, H, C)


def _inputs(seed: int, b: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, m, H, generator=g)
    mask = torch.rand(b, m, generator=g) > 0.4
    y = torch.randint(0, C, (b,), generator=g)
    return h, mask, y


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["cca", "contrastive"]),
    seed=st.integers(0, 10_000),
    b=st.integers(1, 9),
    m=st.integers(1, 5),
)
def test_aux_loss_of_a_batch_is_the_per_sample_losses(name: str, seed: int, b: int, m: int) -> None:
    """Entry i depends on sample i only: the same value alone as in any batch (so the mean is too)."""
    aux = _objective(name, m)
    h, mask, y = _inputs(seed, b, m)
    together = aux(h, mask, y)
    alone = torch.cat([aux(h[i : i + 1], mask[i : i + 1], y[i : i + 1]) for i in range(b)])
    assert together.shape == (b,)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.mean(), alone.mean(), atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    fusion=st.sampled_from(["coattention", "transformer", "gated"]),
    aux=st.sampled_from(["none", "cca", "contrastive"]),
    seed=st.integers(0, 10_000),
    b=st.integers(1, 6),
)
def test_whole_training_loss_is_per_sample(fusion: str, aux: str, seed: int, b: int) -> None:
    """Category + intensity + aux loss of a batch equals each sample's loss alone."""
    torch.manual_seed(0)
    slices = ((0, 3), (3, 5), (5, 6))
    cfg = ModelConfig(fusion=fusion, hidden=H, aux_loss=aux, aux_weight=0.7, intensity_weight=0.5)
    model = build_model(cfg, slices, C, intensity_classes=2)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 6, 6, generator=g)
    mask = (torch.rand(b, 3, generator=g) > 0.3).float()
    y = torch.randint(0, C, (b,), generator=g)
    intensity = torch.randint(-1, 2, (b,), generator=g)
    together = model.sample_losses(x, mask, y, intensity)
    alone = torch.cat(
        [
            model.sample_losses(x[i : i + 1], mask[i : i + 1], y[i : i + 1], intensity[i : i + 1])
            for i in range(b)
        ]
    )
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_cca_loss_is_zero_for_identical_views_and_orthonormal_projections() -> None:
    aux = CCAAlignment(3, H)
    q, _ = torch.linalg.qr(torch.randn(H, H))
    with torch.no_grad():
        for proj in aux.proj:
            proj.weight.copy_(q[: aux.dim])  # orthonormal rows, the same map for every modality
    h = torch.randn(4, 1, H).expand(4, 3, H)
    loss = aux(h, torch.ones(4, 3, dtype=torch.bool), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(loss, torch.zeros(4), atol=1e-5, rtol=0)


def test_cca_terms_match_a_direct_computation() -> None:
    aux = _objective("cca", 3, seed=2)
    h, _, y = _inputs(3, 5, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    ortho = torch.stack([((p.weight @ p.weight.T - torch.eye(aux.dim)) ** 2).sum() for p in aux.proj]).mean()
    expected = []
    for i in range(5):
        present = [m for m in range(3) if mask[i, m]]
        pairs = [(a, b) for a in present for b in present if a < b]
        corr = []
        for a, b in pairs:
            u, v = aux.proj[a](h[i, a]), aux.proj[b](h[i, b])
            corr.append(torch.corrcoef(torch.stack([u, v]))[0, 1])  # Pearson over the D components
        align = torch.stack([1 - c for c in corr]).mean() if corr else torch.tensor(0.0)
        expected.append(align + ortho)
    torch.testing.assert_close(aux(h, mask, y), torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_contrastive_terms_match_a_direct_computation() -> None:
    aux = _objective("contrastive", 3, seed=4)
    assert isinstance(aux, PrototypeContrastive)
    h, _, y = _inputs(5, 5, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    protos = F.normalize(aux.prototypes.weight, dim=-1)
    expected = []
    for i in range(5):
        present = [m for m in range(3) if mask[i, m]]
        u = {m: F.normalize(aux.proj(h[i, m]), dim=-1) for m in present}
        ce = [F.cross_entropy((protos @ u[m] / aux.tau)[None], y[i : i + 1]) for m in present]
        pairs = [1 - u[a] @ u[b] for a in present for b in present if a < b]
        total = (torch.stack(ce).mean() if ce else torch.tensor(0.0)) + (
            torch.stack(pairs).mean() if pairs else torch.tensor(0.0)
        )
        expected.append(total)
    torch.testing.assert_close(aux(h, mask, y), torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_contrastive_loss_falls_when_embeddings_sit_on_their_class_prototype() -> None:
    aux = _objective("contrastive", 2)
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        aux.proj.weight.copy_(torch.eye(aux.dim, H))
        aux.proj.bias.zero_()
        aux.prototypes.weight.copy_(torch.eye(C, aux.dim))
    on_prototype = torch.zeros(3, 2, H)
    on_prototype[torch.arange(3), :, y] = 1.0  # both modalities at the sample's own prototype
    off_prototype = torch.zeros(3, 2, H)
    off_prototype[torch.arange(3), 0, (y + 1) % C] = 1.0
    off_prototype[torch.arange(3), 1, (y + 2) % C] = 1.0
    mask = torch.ones(3, 2, dtype=torch.bool)
    assert torch.all(aux(on_prototype, mask, y) < aux(off_prototype, mask, y))


@pytest.mark.parametrize("name", ["cca", "contrastive"])
def test_absent_modalities_and_garbage_do_not_enter_the_aux_loss(name: str) -> None:
    aux = _objective(name, 4)
    h, mask, y = _inputs(7, 6, 4)
    garbage = torch.where(mask[..., None], h, torch.full_like(h, float("nan")))
    torch.testing.assert_close(aux(h, mask, y), aux(garbage, mask, y))


def test_intensity_loss_ignores_unlabelled_samples_without_batch_normalisation() -> None:
    logits = torch.randn(4, 2)
    labels = torch.tensor([0, -1, 1, -1])
    loss = intensity_loss(logits, labels)
    assert loss[1] == 0 and loss[3] == 0
    torch.testing.assert_close(
        loss[[0, 2]], F.cross_entropy(logits[[0, 2]], labels[[0, 2]], reduction="none")
    )
    assert torch.all(intensity_loss(logits, torch.full((4,), -1)) == 0)


def test_unknown_aux_loss_lists_valid_ones() -> None:
    assert build_aux_objective("none", 2, H, C) is None
    with pytest.raises(ConfigError, match="none, cca, contrastive"):
        build_aux_objective("dcca", 2, H, C)
