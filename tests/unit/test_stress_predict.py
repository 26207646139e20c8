"""The Stress-Predict loader on the real recordings: layout, labels, splits, cache and errors.

Needs ``../shared/data/stress-predict`` (skipped otherwise). The full-dataset fixtures use
the repository's feature cache, so only the very first run pays the ~7 s parse; the cache
and corruption tests build small copies under ``tmp_path`` with their own cache folder.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from fedmer.config import MODALITIES, ConfigError, DataConfig
from fedmer.data.registry import available_datasets
from fedmer.data.stress_predict import (
    WINDOW_S,
    default_cache_dir,
    load_stress_predict,
    load_subjects,
    resolve_root,
)
from tests.conftest import SHARED_DATA

RAW = SHARED_DATA / "stress-predict" / "Raw_data"
if not RAW.is_dir():
    pytest.skip(
        "../shared/data/stress-predict not found; real-data tests need the shared datasets",
        allow_module_level=True,
    )

pytestmark = pytest.mark.data
CFG = DataConfig(name="stress_predict")
SKIPPED = {"S01", "S06", "S17", "S18", "S30"}  # see the module docstring for why


@pytest.fixture(scope="module")
def subjects():
    return load_subjects(RAW, CFG.seq_len, default_cache_dir())


@pytest.fixture(scope="module")
def split():
    return load_stress_predict(CFG, 3, 0)


def _mini_root(tmp_path: Path, copy: str = "S05", link: tuple[str, ...] = ("S07", "S08")) -> Path:
    """A release-layout root with one subject copied (editable) and others symlinked."""
    raw = tmp_path / "data" / "stress-predict" / "Raw_data"
    raw.mkdir(parents=True)
    shutil.copytree(RAW / copy, raw / copy, copy_function=shutil.copyfile)
    for sub in link:
        (raw / sub).symlink_to(RAW / sub, target_is_directory=True)
    return tmp_path / "data"


def test_registered() -> None:
    assert "stress_predict" in available_datasets()


def test_packed_layout(split) -> None:
    for part in (split.train, split.test):
        n = len(part)
        assert part.x.shape == (n, CFG.seq_len, 11) and part.x.dtype == np.float32
        assert np.isfinite(part.x).all()
        assert part.feature_dims == {"speech": 1, "face": 1, "physio": 8, "can": 1}
        assert part.mask.all(axis=0).tolist() == [m == "physio" for m in MODALITIES]
        assert not part.mask[:, [0, 1, 3]].any()
        a, b = part.feature_slices[MODALITIES.index("physio")]
        assert not np.delete(part.x, np.s_[a:b], axis=2).any()
        assert part.class_names == ("baseline", "stress")


def test_subjects_counts_and_balance(subjects) -> None:
    kept, skipped = subjects
    assert set(skipped) == SKIPPED
    assert len(kept) == 30
    for sub in kept:
        assert 60 <= len(sub.y) <= 90, sub.subject
        assert 0.3 <= sub.y.mean() <= 0.5, sub.subject  # both classes, protocol-like mix
        assert abs(sub.x.mean()) < 0.3  # z-scored with the subject's own statistics


def test_skips_are_logged_by_name(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="fedmer.data.stress_predict"):
        load_subjects(RAW, CFG.seq_len, default_cache_dir())
    warned = {r.getMessage().split()[2].rstrip(":") for r in caplog.records if "skipping" in r.getMessage()}
    assert warned == SKIPPED


def test_labels_match_authors_processed_labels(subjects) -> None:
    """Every second inside a window carries the window's label in the authors' own file."""
    path = SHARED_DATA / "stress-predict" / "Processed_data" / "Improved_All_Combined_hr_rsp_binary.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    wanted = {5, 20, 35}
    labels: dict[int, dict[int, int]] = {p: {} for p in wanted}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if int(row["Participant"]) in wanted:
                labels[int(row["Participant"])][int(float(row["Time(sec)"]))] = int(row["Label"])
    checked = 0
    for sub in subjects[0]:
        if sub.person not in wanted:
            continue
        for start, y in zip(sub.start, sub.y, strict=True):
            secs = [labels[sub.person].get(s) for s in range(int(np.ceil(start)), int(start + WINDOW_S))]
            secs = [v for v in secs if v is not None]
            checked += len(secs)
            assert all(v == y for v in secs), (sub.subject, start)
    assert checked > 5000


def test_train_test_persons_disjoint_per_site(split) -> None:
    train_p, test_p = set(split.train.person.tolist()), set(split.test.person.tolist())
    assert not train_p & test_p and len(train_p | test_p) == 30
    for s in range(3):
        assert len(set(split.test.person[split.test.site == s].tolist())) == CFG.test_persons_per_site
        assert len(set(split.train.person[split.train.site == s].tolist())) >= 1


def test_deterministic_in_seed(split) -> None:
    again = load_stress_predict(CFG, 3, 0)
    for a, b in ((split.train, again.train), (split.test, again.test)):
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
        assert np.array_equal(a.person, b.person) and np.array_equal(a.site, b.site)
    other = load_stress_predict(CFG, 3, 1)
    assert set(other.test.person.tolist()) != set(split.test.person.tolist())


def test_too_few_subjects_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="30 usable subjects"):
        load_stress_predict(CFG, 16, 0)


def test_physio_is_required() -> None:
    with pytest.raises(ConfigError, match="only physio"):
        load_stress_predict(DataConfig(name="stress_predict", modalities="speech,face"), 3, 0)


def test_missing_root_names_path_and_layout(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere.*stress-predict/Raw_data/SXX"):
        load_stress_predict(DataConfig(name="stress_predict", root=str(tmp_path / "nowhere")), 1, 0)


def test_relative_root_is_taken_from_the_repo_not_the_cwd(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_root("../shared/data").resolve() == RAW.resolve()


def test_cache_hit_is_faster_and_identical(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDMER_CACHE_DIR", str(tmp_path / "cache"))
    cfg = DataConfig(name="stress_predict", root=str(_mini_root(tmp_path)))
    t0 = time.perf_counter()
    first = load_stress_predict(cfg, 1, 0)
    t1 = time.perf_counter()
    second = load_stress_predict(cfg, 1, 0)
    t2 = time.perf_counter()
    assert len(list((tmp_path / "cache" / "stress_predict").glob("*.npz"))) == 3
    assert t2 - t1 < (t1 - t0) / 5
    assert np.array_equal(first.train.x, second.train.x) and np.array_equal(first.test.y, second.test.y)
    # the key is the files' content: touching changes nothing, a same-size edit that keeps the
    # mtime (what `cp -p` / `rsync -a` of an edited file look like) is recomputed
    acc = tmp_path / "data" / "stress-predict" / "Raw_data" / "S05" / "ACC.csv"
    acc.touch()
    load_stress_predict(cfg, 1, 0)
    assert len(list((tmp_path / "cache" / "stress_predict").glob("*.npz"))) == 3
    before = acc.stat()
    lines = acc.read_text().splitlines()
    i = next(k for k in range(500, len(lines)) if lines[k][-1] in "0123456789" and lines[k][-1] != "9")
    lines[i] = lines[i][:-1] + str(int(lines[i][-1]) + 1)
    acc.write_text("\n".join(lines) + "\n")
    os.utime(acc, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert acc.stat().st_size == before.st_size and acc.stat().st_mtime_ns == before.st_mtime_ns
    load_stress_predict(cfg, 1, 0)
    assert len(list((tmp_path / "cache" / "stress_predict").glob("*.npz"))) == 4


def test_truncated_csv_names_file_and_line(tmp_path) -> None:
    root = _mini_root(tmp_path)
    acc = root / "stress-predict" / "Raw_data" / "S05" / "ACC.csv"
    lines = acc.read_text().splitlines()[:1000]
    acc.write_text("\n".join([*lines, "-12,"]) + "\n")
    with pytest.raises(ValueError, match=r"ACC\.csv, line 1001: expected 3 comma-separated"):
        load_subjects(resolve_root(str(root)), CFG.seq_len, cache_dir=None)


def test_garbage_and_header_only_csv(tmp_path) -> None:
    root = _mini_root(tmp_path)
    folder = root / "stress-predict" / "Raw_data" / "S05"
    bvp = (folder / "BVP.csv").read_text().splitlines()
    (folder / "BVP.csv").write_text("\n".join([*bvp[:50], "abc", *bvp[50:60]]) + "\n")
    with pytest.raises(ValueError, match=r"BVP\.csv, line 51: expected a number, got 'abc'"):
        load_subjects(resolve_root(str(root)), CFG.seq_len, cache_dir=None)
    (folder / "BVP.csv").write_text(bvp[0] + "\n")
    with pytest.raises(ValueError, match=r"BVP\.csv.*truncated"):
        load_subjects(resolve_root(str(root)), CFG.seq_len, cache_dir=None)


def test_a_truncated_tags_file_is_an_error_not_a_dropped_subject(tmp_path) -> None:
    root = _mini_root(tmp_path)
    tags = root / "stress-predict" / "Raw_data" / "S05" / "tags_S05.csv"
    tags.write_text("\n".join(tags.read_text().splitlines()[:6]) + "\n")
    why = r"S05 does not follow the study protocol \(6 tags.*truncated or edited"
    with pytest.raises(ConfigError, match=why):
        load_subjects(resolve_root(str(root)), CFG.seq_len, cache_dir=None)


def test_the_releases_own_off_protocol_sessions_skip_with_warning(tmp_path, caplog) -> None:
    root = _mini_root(tmp_path, copy="S05", link=("S01", "S07"))
    with caplog.at_level(logging.WARNING, logger="fedmer.data.stress_predict"):
        kept, skipped = load_subjects(resolve_root(str(root)), CFG.seq_len, cache_dir=None)
    assert [s.subject for s in kept] == ["S05", "S07"] and list(skipped) == ["S01"]
    assert any("skipping S01: 10 tags" in r.getMessage() for r in caplog.records)
