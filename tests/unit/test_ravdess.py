"""The RAVDESS loader on the real recordings: layout, masks, labels, sites, cache and errors.

Needs ``../shared/data/ravdess`` (skipped otherwise). Full-dataset fixtures use the
repository's feature cache (the first run computes it, ~1-2 min on 2 cores); tests that
damage files work on copies under ``tmp_path`` with their own cache folder.
"""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedmer.config import ConfigError, DataConfig
from fedmer.data.audio_features import AudioFrontEnd
from fedmer.data.ravdess import (
    CLASS_NAMES,
    FACE_FEATURES,
    INTENSITY_NAMES,
    assign_actor_sites,
    default_cache_dir,
    expected_clip_ids,
    load_actor_speech,
    load_ravdess,
    read_face_features,
    speech_of_actors,
)
from fedmer.data.registry import available_datasets
from tests.conftest import SHARED_DATA

DATA = SHARED_DATA / "ravdess"
if not (DATA / "audio16k").is_dir():
    pytest.skip(
        "../shared/data/ravdess not found; real-data tests need the shared datasets", allow_module_level=True
    )
pytestmark = pytest.mark.data

CFG = DataConfig(name="ravdess")
#: The feature cache the full-dataset loads use (before any test points FEDMER_CACHE_DIR elsewhere).
CACHE = default_cache_dir()
SPEECH_DIMS = AudioFrontEnd("logmel", CFG.seq_len).n_features


def _both(split):
    return [split.train, split.test]


@pytest.fixture(scope="module")
def split():
    return load_ravdess(CFG, 4, 0)


def _tmp_root(tmp_path: Path, monkeypatch, copy: str = "Actor_01") -> Path:
    """A release-layout root: one actor copied (editable), the rest and the CSV symlinked."""
    monkeypatch.setenv("FEDMER_CACHE_DIR", str(tmp_path / "cache"))
    audio = tmp_path / "data" / "ravdess" / "audio16k"
    audio.mkdir(parents=True)
    for actor in sorted((DATA / "audio16k").iterdir()):
        if actor.name == copy:
            shutil.copytree(actor, audio / actor.name, copy_function=shutil.copyfile)
        else:
            (audio / actor.name).symlink_to(actor, target_is_directory=True)
    shutil.copyfile(DATA / "face_features.csv", tmp_path / "data" / "ravdess" / "face_features.csv")
    return tmp_path / "data"


def _seed_cache(tmp_path: Path, *, cold: tuple[str, ...] = (), keep: tuple[str, ...] | None = None) -> None:
    """Links to the repository cache's files (of the actors ``keep``, default all) but those of
    ``cold``, in :func:`_tmp_root`'s cache folder: same actor folder names and content, so the
    same keys, and a load there extracts only what is not linked."""
    cache = tmp_path / "cache" / "ravdess"
    cache.mkdir(parents=True)
    for f in CACHE.glob("Actor_*.npz"):
        actor = f.name.split("-")[0]
        if actor not in cold and (keep is None or actor in keep):
            (cache / f.name).symlink_to(f)


def test_registered() -> None:
    assert "ravdess" in available_datasets()


def test_layout_and_shapes(split) -> None:
    assert sum(len(p) for p in _both(split)) == 1440
    for part in _both(split):
        assert part.modalities == ("speech", "face")
        assert part.feature_dims == {"speech": SPEECH_DIMS, "face": len(FACE_FEATURES)}
        assert part.x.shape == (len(part), CFG.seq_len, SPEECH_DIMS + 56) and part.x.dtype == np.float32
        assert np.isfinite(part.x).all()
        assert part.class_names == CLASS_NAMES and part.intensity_names == INTENSITY_NAMES


def test_face_mask_is_the_real_missing_modality(split) -> None:
    mask = np.concatenate([p.mask for p in _both(split)])
    assert mask[:, 0].all() and int(mask[:, 1].sum()) == 360
    for part in _both(split):
        a, b = part.feature_slices[1]
        face = part.x[:, :, a:b]
        assert not face[~part.mask[:, 1]].any()  # absent face: zero columns
        present = face[part.mask[:, 1]]
        assert present.any(axis=(1, 2)).all()
        np.testing.assert_array_equal(present, np.repeat(present[:, :1], CFG.seq_len, axis=1))
    # 15 AV clips per actor (statement 01, repetition 01 of every emotion/intensity)
    persons = np.concatenate([p.person[p.mask[:, 1]] for p in _both(split)])
    assert np.bincount(persons, minlength=25)[1:].tolist() == [15] * 24


def test_labels_follow_the_ravdess_design(split) -> None:
    y = np.concatenate([p.y for p in _both(split)])
    intensity = np.concatenate([p.intensity for p in _both(split)])
    # neutral: 2 statements x 2 repetitions x 24 actors, normal only; others also strong
    assert np.bincount(y).tolist() == [96] + [192] * 7
    assert (intensity[y == 0] == 0).all()
    assert np.bincount(intensity).tolist() == [96 + 7 * 96, 7 * 96]


def test_face_rows_match_their_audio_emotion(split) -> None:
    with (DATA / "face_features.csv").open() as fh:
        rows = {r["file"]: r for r in csv.DictReader(fh)}
    part = split.train
    a = part.feature_slices[1][0]
    ids = [c for actor in sorted(set(part.person.tolist())) for c in expected_clip_ids(actor)]
    assert len(ids) == len(part)  # clips are stored actor by actor, in identifier order
    k = next(i for i, c in enumerate(ids) if c.endswith("-01-01-" + c[-2:]))
    row = rows["01-01-" + ids[k][6:] + ".mp4"]
    assert part.mask[k, 1] and row["emotion"] == CLASS_NAMES[part.y[k]]
    assert part.x[k, 0, a] == pytest.approx(float(row[FACE_FEATURES[0]]), rel=1e-6)


def test_actor_disjoint_sites_with_both_genders(split) -> None:
    train, test = split.train, split.test
    assert not set(train.person.tolist()) & set(test.person.tolist())
    assert len(set(test.person.tolist())) == 4 * CFG.test_persons_per_site
    for part in (train, test):  # an actor lives in exactly one site
        pairs = set(zip(part.person.tolist(), part.site.tolist(), strict=True))
        assert len(pairs) == len(set(part.person.tolist()))
    for s in range(4):
        actors = set(train.person[train.site == s].tolist()) | set(test.person[test.site == s].tolist())
        assert len(actors) == 6 and {a % 2 for a in actors} == {0, 1}
    assert {a % 2 for a in test.person.tolist()} == {0, 1}


@pytest.mark.parametrize("sites", [1, 4, 5, 6, 12])
def test_site_assignment_is_seeded_and_complete(sites: int) -> None:
    actors = np.arange(1, 25)
    site, is_test = assign_actor_sites(actors, sites, 1, seed=3)
    again = assign_actor_sites(actors, sites, 1, seed=3)
    assert np.array_equal(site, again[0]) and np.array_equal(is_test, again[1])
    assert sorted(set(site.tolist())) == list(range(sites))
    assert np.bincount(site[is_test]).tolist() == [1] * sites
    assert np.bincount(site).max() - np.bincount(site).min() <= 1
    assert not np.array_equal(site, assign_actor_sites(actors, sites, 1, seed=4)[0]) or sites == 1


def test_too_many_sites_names_the_numbers() -> None:
    with pytest.raises(ConfigError, match=r"24 actors.*13 sites.*test_persons_per_site=1.*need 26"):
        load_ravdess(CFG, 13, 0)


def test_complete_only_and_audio_only() -> None:
    av = load_ravdess(DataConfig(name="ravdess", complete_only=True), 4, 0)
    assert sum(len(p) for p in _both(av)) == 360 and all(p.mask.all() for p in _both(av))
    audio = load_ravdess(DataConfig(name="ravdess", modalities="speech"), 4, 0)
    assert sum(len(p) for p in _both(audio)) == 1440
    # complete_only means the 360 AV clips whichever modalities are selected: audio alone on them
    audio360 = load_ravdess(DataConfig(name="ravdess", modalities="speech", complete_only=True), 4, 0)
    assert [len(p) for p in _both(audio360)] == [len(p) for p in _both(av)]
    assert all(np.array_equal(a.y, b.y) for a, b in zip(_both(audio360), _both(av), strict=True))
    assert audio.train.modalities == ("speech",) and audio.train.feature_dims == {"speech": SPEECH_DIMS}
    # the front-end choice is passed through (complete_only: a quarter of a cold cache's extraction)
    mfcc = DataConfig(name="ravdess", modalities="speech", audio_frontend="mfcc", complete_only=True)
    assert load_ravdess(mfcc, 4, 0).train.feature_dims == {"speech": AudioFrontEnd("mfcc").n_features}


def test_cache_is_reused_and_a_corrupt_file_rebuilt(tmp_path, monkeypatch, caplog) -> None:
    folder, cache = DATA / "audio16k" / "Actor_05", tmp_path / "cache"
    fe = AudioFrontEnd("logmel", 8)
    first = load_actor_speech(folder, fe, cache)
    (written,) = list(cache.glob("*.npz"))
    assert first.shape == (60, 8, fe.n_features)

    def no_audio(path):
        raise AssertionError(f"read {path} although the cache holds it")

    with monkeypatch.context() as m:
        m.setattr("fedmer.data.ravdess.read_flac", no_audio)
        np.testing.assert_array_equal(load_actor_speech(folder, fe, cache), first)
    written.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="fedmer.data.ravdess"):
        rebuilt = load_actor_speech(folder, fe, cache)
    assert "unreadable cache file" in caplog.text
    np.testing.assert_array_equal(rebuilt, first)
    assert np.load(written)["x"].shape == first.shape  # rewritten whole
    load_actor_speech(folder, AudioFrontEnd("logmel", 9), cache)  # other parameters: another file
    assert len(list(cache.glob("*.npz"))) == 2


def test_cold_actors_are_extracted_on_every_core_with_the_same_features(tmp_path) -> None:
    """A cold cache is filled by worker processes; the features equal one process's, in order."""
    dirs = [DATA / "audio16k" / f"Actor_{a:02d}" for a in (3, 4, 6)]
    fe = AudioFrontEnd("logmel", 8, level_norm=True)  # what speech_of_actors builds by default
    serial = np.concatenate([load_actor_speech(d, fe, None) for d in dirs])
    (tmp_path / "warm").mkdir()
    load_actor_speech(dirs[0], fe, tmp_path / "warm")  # one already cached
    parallel = speech_of_actors(dirs, "logmel", 8, tmp_path / "warm")
    np.testing.assert_array_equal(parallel, serial)
    assert len(list((tmp_path / "warm").glob("*.npz"))) == 3


def test_a_clip_selection_extracts_only_those_clips_and_reuses_a_whole_actors_cache(tmp_path, split) -> None:
    """``clips`` (complete_only's 15 clips an actor) from a cold cache: only they are extracted,
    on the workers, under their own key, equal to the whole actors' rows; an actor whose 60 clips
    are cached (here by the ``split`` fixture) is sliced from that file, nothing extracted."""
    dirs = [DATA / "audio16k" / f"Actor_{a:02d}" for a in (8, 9)]
    fe = AudioFrontEnd("logmel", CFG.seq_len, level_norm=True)  # data.audio_level_norm's default
    whole = np.concatenate([load_actor_speech(d, fe, CACHE) for d in dirs])
    ids = [c for d in dirs for c in expected_clip_ids(int(d.name[-2:]))]
    av = {c for c in ids if c.split("-")[4:6] == ["01", "01"]}  # statement 01, repetition 01
    expected = whole[np.array([c in av for c in ids])]

    cold = tmp_path / "cold"
    np.testing.assert_array_equal(speech_of_actors(dirs, "logmel", CFG.seq_len, cold, clips=av), expected)
    written = sorted(cold.glob("*.npz"))
    assert len(written) == 2 and all(np.load(f)["x"].shape == (15, CFG.seq_len, SPEECH_DIMS) for f in written)

    _seed_cache(tmp_path / "warm", keep=("Actor_08", "Actor_09"))
    before = set((tmp_path / "warm").rglob("*"))
    warm = tmp_path / "warm" / "cache" / "ravdess"
    np.testing.assert_array_equal(speech_of_actors(dirs, "logmel", CFG.seq_len, warm, clips=av), expected)
    assert set((tmp_path / "warm").rglob("*")) == before  # sliced from the 60-clip files


def test_bad_root_says_what_layout_is_expected(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"data.root=.*ravdess/audio16k/Actor_01.*official RAVDESS release"):
        load_ravdess(DataConfig(name="ravdess", root=str(tmp_path)), 4, 0)


def test_corrupt_flac_is_named(tmp_path, monkeypatch, split) -> None:
    """Two cold actors (the ``split`` fixture warmed the others): one worker fails on the damaged
    file, and the load then names it."""
    root = _tmp_root(tmp_path, monkeypatch)
    _seed_cache(tmp_path, cold=("Actor_01", "Actor_02"))
    bad = root / "ravdess" / "audio16k" / "Actor_01" / "03-01-05-02-01-01-01.flac"
    bad.write_bytes(b"fLaC but not really" * 10)
    with pytest.raises(ValueError, match="03-01-05-02-01-01-01.flac"):
        load_ravdess(DataConfig(name="ravdess", root=str(root)), 4, 0)


def test_missing_and_malformed_files_are_named(tmp_path, monkeypatch) -> None:
    root = _tmp_root(tmp_path, monkeypatch)
    actor = root / "ravdess" / "audio16k" / "Actor_01"
    cfg = DataConfig(name="ravdess", root=str(root))
    (actor / "03-01-03-01-02-02-01.flac").unlink()
    with pytest.raises(ValueError, match=r"lacks 1 of its 60.*03-01-03-01-02-02-01.flac"):
        load_ravdess(cfg, 4, 0)
    shutil.copyfile(actor / "03-01-03-01-02-01-01.flac", actor / "03-01-03-01-02-02-01.flac")
    shutil.copyfile(actor / "03-01-03-01-02-01-01.flac", actor / "03-01-09-01-02-01-01.flac")
    with pytest.raises(ValueError, match=r"malformed.*03-01-09-01-02-01-01"):
        load_ravdess(cfg, 4, 0)


def test_face_csv_problems_are_named(tmp_path) -> None:
    with (DATA / "face_features.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames or []), list(reader)
    ids = {c for a in range(1, 25) for c in expected_clip_ids(a)}

    def write(name: str, cols: list[str], data: list[dict]) -> Path:
        path = tmp_path / name
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(data)
        return path

    assert len(read_face_features(write("ok.csv", fields, rows), ids)) == 360
    no_au = [c for c in fields if c != "AU01_mean"]
    with pytest.raises(ValueError, match="lacks the columns AU01_mean"):
        read_face_features(write("cols.csv", no_au, rows), ids)
    wrong = [dict(rows[0], emotion="calm" if rows[0]["emotion"] != "calm" else "sad"), *rows[1:]]
    with pytest.raises(ValueError, match="line 2: emotion"):
        read_face_features(write("emo.csv", fields, wrong), ids)
    with pytest.raises(ValueError, match="a second row"):
        read_face_features(write("dup.csv", fields, [*rows, rows[0]]), ids)


def test_cache_key_hashes_content_a_same_size_same_mtime_edit_is_recomputed(tmp_path) -> None:
    """An edit that keeps size and mtime (a ``cp -p`` of a re-tagged file) is a new cache key."""
    import os

    folder = tmp_path / "Actor_03"
    shutil.copytree(DATA / "audio16k" / "Actor_03", folder)
    fe, cache = AudioFrontEnd("mfcc", 3), tmp_path / "cache"
    first = load_actor_speech(folder, fe, cache)
    victim = sorted(folder.glob("*.flac"))[0]
    stat = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[26 + 8] ^= 0xFF  # a byte of STREAMINFO's MD5 signature: same size, same samples
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size and victim.stat().st_mtime_ns == stat.st_mtime_ns
    again = load_actor_speech(folder, fe, cache)
    assert len(list(cache.glob("*.npz"))) == 2  # recomputed under a new key, not read back
    np.testing.assert_array_equal(again, first)
