"""Federated standardisation: exact statistics, the release's sensitivity and noise, the model layer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.config import ModelConfig
from fedmer.data.base import MultimodalDataset, concat_datasets
from fedmer.data.feature_stats import (
    FeatureStats,
    combine_releases,
    exact_feature_stats,
    local_release,
    read_feature_stats,
)
from fedmer.models import build_model
from fedmer.models.standardizer import InputStandardizer
from fedmer.privacy.clipping import clip_update
from tests.conftest import TOY_MODALITIES, TOY_SLICES, dp_sgd_setup, toy_dataset

MODS, SLICES = TOY_MODALITIES, TOY_SLICES


def _data(n: int, seed: int, present: float = 0.7, scale: float = 3.0) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=9) * scale
    spread = np.exp(rng.normal(size=9))
    x = centre + spread * rng.normal(size=(n, 5, 9))
    mask = rng.random((n, 3)) < present
    mask[:, 0] |= ~mask.any(axis=1)  # every sample records something
    mask[:2] = True  # and every modality is recorded by at least two samples
    return toy_dataset(x, mask)


def _pooled(data: MultimodalDataset) -> dict[str, np.ndarray]:
    """Each statistic computed directly on the samples that recorded the feature's modality."""
    out = {k: np.zeros(9) for k in ("mean", "std", "mean_sd", "std_mean", "std_sd")}
    for m, (a, b) in enumerate(SLICES):
        clips = data.x[data.mask[:, m]][:, :, a:b].astype(np.float64)
        frames = clips.reshape(-1, b - a)
        out["mean"][a:b], out["std"][a:b] = frames.mean(axis=0), frames.std(axis=0)
        out["mean_sd"][a:b] = clips.mean(axis=1).std(axis=0)
        out["std_mean"][a:b] = clips.std(axis=1).mean(axis=0)
        out["std_sd"][a:b] = clips.std(axis=1).std(axis=0)
    return out


def _stats(f: int = 3, **kw: object) -> FeatureStats:
    base = {k: (1.0,) * f for k in ("mean", "std", "mean_sd", "std_mean", "std_sd")}
    return FeatureStats(**(base | {"count": (1.0,)} | kw))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 60), seed=st.integers(0, 10_000), clients=st.integers(1, 4))
def test_without_noise_the_clients_sums_give_the_pooled_statistics(n: int, seed: int, clients: int) -> None:
    parts = [_data(n + k, seed + k) for k in range(clients)]
    releases = {
        k: local_release(p, clip_norm=math.inf, noise_multiplier=0.0, rng=np.random.default_rng(0))
        for k, p in enumerate(parts)
    }
    stats = combine_releases(releases, SLICES)
    direct = _pooled(concat_datasets(parts))
    for key, expected in direct.items():
        # a std of ~0 (one present sample) is replaced by 1: nothing to scale by
        got = np.where(expected < 1e-6, 0.0, np.array(getattr(stats, key)))
        np.testing.assert_allclose(got, np.where(expected < 1e-6, 0.0, expected), rtol=1e-6, atol=1e-9)
    assert stats.count == tuple(float(c) for c in concat_datasets(parts).mask.sum(axis=0))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 10_000), clip=st.floats(0.1, 50.0), drop=st.integers(0, 39))
def test_one_sample_moves_the_release_by_at_most_sqrt2_c(n: int, seed: int, clip: float, drop: int) -> None:
    """The Gaussian mechanism's L2 sensitivity under add/remove-one is sqrt(2) C, as accounted."""
    data = _data(n, seed, scale=10.0)
    keep = np.arange(n) != drop % n
    smaller = toy_dataset(data.x[keep], data.mask[keep])

    def vector(d: MultimodalDataset) -> np.ndarray:
        return local_release(d, clip_norm=clip, noise_multiplier=0.0, rng=np.random.default_rng(0)).vector()

    assert np.linalg.norm(vector(data) - vector(smaller)) <= math.sqrt(2) * clip * (1 + 1e-9)


def test_the_noise_has_the_accounted_scale() -> None:
    data = _data(30, 1)
    exact = local_release(data, clip_norm=4.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    draws = np.stack(
        [
            r.vector() - exact.vector()
            for r in (
                local_release(data, clip_norm=4.0, noise_multiplier=1.5, rng=np.random.default_rng(s))
                for s in range(400)
            )
        ]
    )
    expected = 1.5 * math.sqrt(2) * 4.0
    assert exact.clipped > 0  # scale 3 features over 9 columns: some samples exceed C = 4
    # 400 x 21 normal draws: the sample sd is within 3 % of sigma with overwhelming probability
    assert draws.std() == pytest.approx(expected, rel=0.03)
    assert abs(draws.mean()) < 5 * expected / math.sqrt(draws.size)


def test_a_constant_feature_is_centred_not_scaled() -> None:
    data = _data(50, 2)
    x = data.x.copy()
    x[:, :, 1] = 4.0
    const = toy_dataset(x, data.mask)
    stats = exact_feature_stats(const)
    assert stats.std[1] == 1.0 and stats.mean[1] == pytest.approx(4.0) and stats.floored == (1,)


def test_statistics_drowned_in_noise_leave_the_features_as_they_are() -> None:
    """Little data, much noise: no feature is standardised by noise (the identity, as with none)."""
    release = local_release(_data(50, 2), clip_norm=20.0, noise_multiplier=50.0, rng=np.random.default_rng(3))
    stats = combine_releases({0: release}, SLICES)
    assert stats.floored == tuple(range(9))
    assert stats.mean == (0.0,) * 9 and stats.std == (1.0,) * 9
    assert stats.mean_sd == (1.0,) * 9 and stats.std_mean == (0.0,) * 9 and stats.std_sd == (1.0,) * 9


def test_with_enough_data_the_noisy_statistics_track_the_exact_ones() -> None:
    data = _data(4000, 7, present=1.0)
    x = data.x.astype(np.float64)
    m, sd = x.mean(axis=1), x.std(axis=1)
    clip = 1.01 * float(
        np.linalg.norm(np.concatenate([m, m**2, sd, sd**2], axis=1), axis=1).max()
    )  # no clipping
    exact = exact_feature_stats(data)
    noisy = combine_releases(
        {0: local_release(data, clip_norm=clip, noise_multiplier=1.0, rng=np.random.default_rng(11))}, SLICES
    )
    noise = math.sqrt(2) * clip / 4000  # sd of each released average
    trusted = [i for i in range(9) if i not in noisy.floored]
    assert trusted  # the test data has features with a spread well above this noise
    for i in trusted:
        assert abs(noisy.mean[i] - exact.mean[i]) <= 6 * noise
        var_tol = 6 * noise * (2 + 2 * abs(exact.mean[i]))  # E[m^2] + E[s^2] - mean^2
        assert abs(noisy.std[i] ** 2 - exact.std[i] ** 2) <= var_tol


def test_bad_inputs_are_named(tmp_path) -> None:
    data = _data(10, 0)
    with pytest.raises(ValueError, match="invalid noise_multiplier=-1"):
        local_release(data, clip_norm=1.0, noise_multiplier=-1.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="invalid clip_norm=inf"):
        local_release(data, clip_norm=math.inf, noise_multiplier=1.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs a random generator"):
        local_release(data, clip_norm=1.0, noise_multiplier=1.0, rng=None)
    with pytest.raises(ValueError, match="no client released"):
        combine_releases({}, SLICES)
    a = local_release(data, clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    b = local_release(data, clip_norm=2.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="different settings"):
        combine_releases({0: a, 1: b}, SLICES)
    with pytest.raises(ValueError, match="std > 0"):
        _stats(std=(1.0, 0.0, 1.0))
    bad = tmp_path / "feature_stats.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="feature_stats.json is not a FedMER feature-statistics file"):
        read_feature_stats(bad)


def test_statistics_round_trip_through_json(tmp_path) -> None:
    stats = combine_releases(
        {3: local_release(_data(20, 5), clip_norm=10.0, noise_multiplier=1.0, rng=np.random.default_rng(1))},
        SLICES,
    )
    stats.write(tmp_path / "s.json")
    assert read_feature_stats(tmp_path / "s.json") == stats and stats.clients == (3,)


def test_the_model_standardises_its_input_and_carries_the_statistics() -> None:
    data = _data(40, 4)
    stats = exact_feature_stats(data)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=8), SLICES, 4, MODS, standardize=True)
    model.set_feature_stats(stats)
    x = torch.from_numpy(data.x)
    expected = (x - torch.tensor(stats.mean, dtype=torch.float32)) / torch.tensor(
        stats.std, dtype=torch.float32
    )
    torch.testing.assert_close(model.standardizer(x), expected)
    state = model.state_dict()
    assert torch.equal(state["standardizer.scale"], 1 / torch.tensor(stats.std, dtype=torch.float32))
    torch.manual_seed(0)
    twin = build_model(ModelConfig(hidden=8), SLICES, 4, MODS, standardize=True)
    twin.load_state_dict(state)  # the statistics travel with the weights (messages, checkpoint)
    mask = torch.from_numpy(data.mask.astype(np.float32))
    torch.testing.assert_close(twin(x, mask), model(x, mask))
    with pytest.raises(ValueError, match="statistics for 3 features, but the model reads 9"):
        InputStandardizer(9).set_stats(_stats())


def test_dp_sgd_leaves_the_statistics_alone_and_their_update_is_zero() -> None:
    data = _data(40, 4)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=8), SLICES, 4, MODS, standardize=True)
    model.set_feature_stats(exact_feature_stats(data))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = data.to_tensors()
    private, optimizer, loader = dp_sgd_setup(model, tensors.tensors, batch_size=8)
    for x, mask, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(private(x, mask), y).backward()
        optimizer.step()
    after = model.state_dict()
    trained = [k for k, p in model.named_parameters() if not torch.equal(after[k], before[k])]
    assert trained  # DP-SGD did move the weights
    for key in ("standardizer.shift", "standardizer.scale"):
        assert torch.equal(after[key], before[key])
    clipped, _, _ = clip_update(after, before, 0.01)
    for key in ("standardizer.shift", "standardizer.scale"):
        assert torch.equal(torch.as_tensor(clipped[key]), before[key])


def test_functionals_are_standardised_with_the_released_statistics() -> None:
    """After set_feature_stats, a per-clip model sees its training functionals at mean 0, std 1."""
    data = _data(200, 6, present=1.0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="functionals", hidden=8), SLICES, 4, MODS, standardize=True)
    model.set_feature_stats(exact_feature_stats(data))
    z = model.standardizer(torch.from_numpy(data.x))
    for enc, (a, b) in zip(model.encoders, SLICES, strict=True):
        zm = z[:, :, a:b]
        f = torch.cat([zm.mean(dim=1), torch.sqrt(zm.var(dim=1, unbiased=False) + 1e-6)], dim=-1)
        g = (f - enc.shift) * enc.scale
        torch.testing.assert_close(g.mean(dim=0), torch.zeros(2 * (b - a)), atol=2e-3, rtol=0)
        torch.testing.assert_close(g.std(dim=0, unbiased=False), torch.ones(2 * (b - a)), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="built without an input standardiser"):
        build_model(ModelConfig(encoder="functionals", hidden=8), SLICES, 4, MODS).set_feature_stats(
            exact_feature_stats(data)
        )
