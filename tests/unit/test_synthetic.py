"""The synthetic generator: deterministic, well-formed, and realistic where it matters."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.config import MODALITIES, ConfigError, DataConfig
from fedmer.data.base import DatasetSplit, MultimodalDataset
from fedmer.data.synthetic import generate_synthetic, scenario_class_names

SMALL = DataConfig(persons_per_site=2, test_persons_per_site=1, sequences_per_person=10, seq_len=8)


def _arrays(ds: MultimodalDataset) -> tuple[np.ndarray, ...]:
    return ds.x, ds.mask, ds.y, ds.person, ds.site


def _check_well_formed(split: DatasetSplit, cfg: DataConfig, num_sites: int) -> None:
    per_person = cfg.sequences_per_person
    for ds, persons in ((split.train, cfg.persons_per_site), (split.test, cfg.test_persons_per_site)):
        n = num_sites * persons * per_person
        assert ds.x.shape == (n, cfg.seq_len, sum(ds.feature_dims.values()))
        assert ds.x.dtype == np.float32 and ds.mask.dtype == bool
        assert ds.y.dtype == ds.person.dtype == ds.site.dtype == np.int64
        assert ds.modalities == MODALITIES
        assert np.isfinite(ds.x).all()
        assert set(np.unique(ds.site).tolist()) == set(range(num_sites))
        assert len(np.unique(ds.person)) == num_sites * persons
        for j, (a, b) in enumerate(ds.feature_slices):
            assert not ds.x[~ds.mask[:, j], :, a:b].any(), "absent modality must have zero columns"
    assert not set(split.train.person.tolist()) & set(split.test.person.tolist())


@pytest.mark.parametrize("scenario", ["driving", "clinic"])
def test_default_config_is_well_formed(scenario: str) -> None:
    cfg = DataConfig(scenario=scenario)
    split = generate_synthetic(cfg, num_sites=10, seed=0)
    _check_well_formed(split, cfg, 10)
    assert split.train.class_names == scenario_class_names(scenario)
    dims = split.train.feature_dims
    assert dims["speech"] == 16 and dims["face"] == 10 and dims["can"] == 4
    assert dims["physio"] == (2 if scenario == "driving" else 3)
    # present columns carry signal; standardised on the training data
    for j, (a, b) in enumerate(split.train.feature_slices):
        present = split.train.x[split.train.mask[:, j], :, a:b]
        if present.size:
            assert np.abs(present.mean(axis=(0, 1))).max() < 0.05
            assert np.allclose(present.std(axis=(0, 1)), 1.0, atol=0.05)


def test_same_seed_is_bit_identical_and_other_seed_differs() -> None:
    a, b = generate_synthetic(SMALL, 3, seed=7), generate_synthetic(SMALL, 3, seed=7)
    for part in ("train", "test"):
        for u, v in zip(_arrays(getattr(a, part)), _arrays(getattr(b, part)), strict=True):
            assert np.array_equal(u, v)
    c = generate_synthetic(SMALL, 3, seed=8)
    assert not np.array_equal(a.train.x, c.train.x)
    assert not np.array_equal(a.train.y, c.train.y)


def test_classes_balanced_per_person() -> None:
    split = generate_synthetic(DataConfig(sequences_per_person=23), 4, seed=1)
    for ds in (split.train, split.test):
        for p in np.unique(ds.person):
            counts = np.bincount(ds.y[ds.person == p], minlength=ds.num_classes)
            assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("scenario", ["driving", "clinic"])
def test_each_site_has_one_sensor_kit_in_its_mask(scenario: str) -> None:
    split = generate_synthetic(DataConfig(scenario=scenario), 30, seed=3)
    kits = []
    for s in range(30):
        masks = np.concatenate(
            [split.train.mask[split.train.site == s], split.test.mask[split.test.site == s]]
        )
        assert (masks == masks[0]).all(), "all samples of a site share its sensors"
        kit = masks[0]
        assert kit[0] or kit.sum() >= 2, "every site has speech or at least two modalities"
        kits.append(kit)
    kits_arr = np.array(kits)
    assert (kits_arr.sum(axis=1) < kits_arr.sum(axis=1).max()).any(), "some sites miss a sensor"
    real = [m for m in MODALITIES if scenario == "driving" or m != "can"]
    assert kits_arr[:, [MODALITIES.index(m) for m in real]].mean() > 0.65, "most sites have most sensors"
    if scenario == "clinic":
        assert not kits_arr[:, MODALITIES.index("can")].any()


def test_modality_restriction_masks_the_rest_and_changes_nothing_else() -> None:
    full = generate_synthetic(SMALL, 4, seed=2).train
    part = generate_synthetic(replace(SMALL, modalities="face,speech"), 4, seed=2).train
    keep = np.array([m in ("speech", "face") for m in MODALITIES])
    assert np.array_equal(part.mask, full.mask & keep)
    assert np.array_equal(part.x, full.with_mask(full.mask & keep).x)
    assert np.array_equal(part.y, full.y)


def test_clinic_without_any_available_modality_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="can"):
        generate_synthetic(DataConfig(scenario="clinic", modalities="can"), 2, seed=0)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_num_sites_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="num_sites"):
        generate_synthetic(SMALL, bad, seed=0)  # type: ignore[arg-type]


def test_half_rate_sensors_sample_and_hold() -> None:
    split = generate_synthetic(DataConfig(), 10, seed=0)
    ds = split.train
    held = set()
    for s in range(10):
        rows = ds.site == s
        for j, (a, b) in enumerate(ds.feature_slices):
            block = ds.x[rows, :, a:b]
            if ds.mask[rows, j].all() and np.array_equal(block[:, 1::2], block[:, 0::2]):
                held.add(MODALITIES[j])
    assert held and "speech" not in held


def test_emotion_unfolds_over_time() -> None:
    """Class means drift apart from the start to the end of a sequence (onset ramp)."""
    ds = generate_synthetic(DataConfig(), 10, seed=0).train
    a, b = ds.feature_slices[0]
    speech = ds.x[ds.mask[:, 0], :, a:b].mean(axis=2)
    y = ds.y[ds.mask[:, 0]]
    spread = [np.ptp([speech[y == c, t].mean() for c in range(ds.num_classes)]) for t in (0, -1)]
    assert spread[1] > 2 * spread[0]


@settings(max_examples=15, deadline=None)
@given(
    scenario=st.sampled_from(["driving", "clinic"]),
    num_sites=st.integers(1, 4),
    persons=st.integers(1, 3),
    test_persons=st.integers(1, 2),
    seqs=st.integers(1, 12),
    seq_len=st.integers(4, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_small_config_is_well_formed(
    scenario: str, num_sites: int, persons: int, test_persons: int, seqs: int, seq_len: int, seed: int
) -> None:
    cfg = DataConfig(
        scenario=scenario,
        persons_per_site=persons,
        test_persons_per_site=test_persons,
        sequences_per_person=seqs,
        seq_len=seq_len,
    )
    _check_well_formed(generate_synthetic(cfg, num_sites, seed), cfg, num_sites)
