"""MELD (Poria et al., ACL 2019): Friends dialogue transcripts, 7 emotions, speakers grouped into sites.

Reads ``<data.root>/meld/{train,dev,test}_sent_emo.csv`` (the official release: columns
``Utterance``, ``Speaker``, ``Emotion``, ...; 13,708 utterances) and pools all three files:
the official split is by dialogue, with the same speakers in each part, so it cannot give a
person-disjoint test set. One sample = one utterance, without its dialogue context.

**Text.** ``data.text_encoder=tokens``: ``data.seq_len`` hashed token ids per utterance in
``x[:, :, 0]`` (``fedmer.data.text_features``; truncated, 0-padded). ``minilm``: the 384-d
pretrained sentence vector as one frame, ``x`` of shape ``(N, 1, 384)`` (a sentence vector
has no time axis; broadcasting it over ``seq_len`` frames would cost ``seq_len`` times the
memory in every client process), cached under ``.fedmer_cache/meld/``.

**Encoding quirks.** Files are decoded as UTF-8 (a BOM is dropped); a file that is not valid
UTF-8 is decoded as cp1252 with a WARNING. C1 control characters (``"\\x92"`` for a right
quote, the original release's cp1252-read-as-Latin-1 artefact) are mapped back through cp1252
in utterances and speaker names, and counted in the log.

**Persons** are speakers (id = index of the normalised label in sorted order). Labels are
normalised: cp1252 repair, NFKC, ASCII quotes, whitespace collapsed, a trailing ``.`` dropped
("Phoebe Sr." = "Phoebe Sr"), and ``X/role`` is X playing a role ("Joey/Drake" -> Joey).
A joint label "A and B" stays its own person; it is held out when any main character in it is,
else it joins the site of its first main character, so a held-out main character's joint lines
never reach training.

**Sites and held-out speakers** (:func:`assign_speakers`, seeded, deterministic): the six
speakers with >= ``MAIN_MIN_UTTERANCES`` lines are *main characters* (1.8k-2.1k each, 83 % of
the data); the other 282 are *minor* (joint labels aside). One main character, drawn by the seed
among those with >= ``MIN_TEST_PER_CLASS`` lines of every class, is held out for test: minor
speakers alone have about 50 fear and 40 disgust lines, too few to estimate those recalls. The
other main characters are dealt one per site over a seeded permutation of sites (round robin
when there are fewer sites than characters; sites beyond them get none). Minor speakers, largest
first (seeded tie order), are dealt in snake order, which gives every site the same number of
them (+-1) and similar line counts; then each site holds out ``data.test_persons_per_site`` of
its minor speakers (seeded). So ``data.test_persons_per_site`` = held-out *minor* speakers per
site, and the test set = one main character + ``num_sites x test_persons_per_site`` minor
speakers. ``data.persons_per_site``, ``sequences_per_person``, ``scenario`` and ``audio_frontend``
are ignored (the transcripts fix them); ``complete_only=true`` is refused by the config.

**Caveats.** Held-out-speaker evaluation is harder than MELD's official utterance split, so
numbers are not comparable with the literature. Some labels are not one person ("All",
"Both", "Woman"), spelling variants stay distinct ("Dr. Ledbetter"/"Dr. Leedbetter"), and
roles a main character plays under another name ("Dr. Drake Remoray") are not resolved.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmer.cache import REPO_ROOT, cache_dir
from fedmer.config import ConfigError, DataConfig
from fedmer.data.base import DatasetSplit, MultimodalDataset
from fedmer.data.digest import file_digest
from fedmer.data.registry import register_dataset
from fedmer.data.text_features import (
    MINILM_DIM,
    clean_text,
    encode_tokens,
    minilm_embeddings,
    minilm_model_key,
)

__all__ = [
    "CLASS_NAMES",
    "MAIN_MIN_UTTERANCES",
    "MIN_TEST_PER_CLASS",
    "MODALITIES",
    "REQUIRED_COLUMNS",
    "SPLIT_FILES",
    "MeldUtterances",
    "assign_speakers",
    "load_meld",
    "normalize_speaker",
    "read_meld",
    "resolve_root",
]

_log = logging.getLogger(__name__)

SPLIT_FILES: tuple[str, ...] = ("train_sent_emo.csv", "dev_sent_emo.csv", "test_sent_emo.csv")
CLASS_NAMES: tuple[str, ...] = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
REQUIRED_COLUMNS: tuple[str, ...] = ("Utterance", "Speaker", "Emotion")
MODALITIES: tuple[str, ...] = ("text",)
MAIN_MIN_UTTERANCES = 500
MIN_TEST_PER_CLASS = 30
_ASSIGN_STREAM = 303  # keeps the speaker draw apart from other seeded streams
_CACHE_VERSION = 1


@dataclass(frozen=True)
class MeldUtterances:
    """Every utterance of the three files, in file then row order."""

    text: tuple[str, ...]  # cp1252-repaired utterance
    speaker: tuple[str, ...]  # normalised speaker label
    y: np.ndarray  # (N,) int64 index into CLASS_NAMES
    repaired: int = 0  # fields that held cp1252 artefacts


def resolve_root(root: str) -> Path:
    """``data.root`` -> the ``meld`` folder holding the three CSVs (relative to the repo root)."""
    base = Path(root).expanduser()
    base = base if base.is_absolute() else REPO_ROOT / base
    folder = base / "meld"
    missing = [name for name in SPLIT_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"invalid data.root={root!r}: {folder} lacks {', '.join(missing)}; data.root must point at "
            f"a folder containing meld/{{{','.join(SPLIT_FILES)}}} (the official MELD release)"
        )
    return folder


def normalize_speaker(label: str) -> str:
    """One name per person: cp1252 repair, ASCII quotes, spaces collapsed, no trailing '.', X/role -> X."""
    name = " ".join(clean_text(label).split()).rstrip(".").strip()
    if "/" in name:
        name = name.split("/", 1)[0].strip()
    return name


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        _log.warning("meld: %s is not UTF-8 (%s); decoding it as cp1252", path, err)
        return raw.decode("cp1252", errors="replace")


def _read_file(path: Path) -> tuple[list[str], list[str], list[int], int]:
    """Utterances, speakers, labels and the number of repaired fields of one CSV."""
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""))
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ConfigError(
            f"{path}: missing column(s) {', '.join(missing)}; found {header}; a MELD file needs "
            f"{', '.join(REQUIRED_COLUMNS)}"
        )
    text, speaker, label, repaired = [], [], [], 0
    for row in reader:
        line = reader.line_num
        values = [row[c] for c in REQUIRED_COLUMNS]
        if any(v is None for v in values):
            raise ConfigError(
                f"{path}, line {line}: too few fields for columns {', '.join(REQUIRED_COLUMNS)}"
            )
        utterance, who, emotion = values
        emotion = emotion.strip().lower()
        if emotion not in CLASS_NAMES:
            raise ConfigError(
                f"{path}, line {line}: invalid Emotion {values[2]!r}; "
                f"expected one of {', '.join(CLASS_NAMES)}"
            )
        name = normalize_speaker(who)
        if not name:
            raise ConfigError(f"{path}, line {line}: empty Speaker")
        repaired += sum(bool(re.search("[\u0080-\u009f]", v)) for v in (utterance, who))
        text.append(clean_text(utterance))
        speaker.append(name)
        label.append(CLASS_NAMES.index(emotion))
    return text, speaker, label, repaired


def read_meld(folder: Path) -> MeldUtterances:
    """Parse the three files of ``folder`` (see :func:`resolve_root`)."""
    text: list[str] = []
    speaker: list[str] = []
    label: list[int] = []
    repaired = 0
    for name in SPLIT_FILES:
        t, s, y, r = _read_file(folder / name)
        text += t
        speaker += s
        label += y
        repaired += r
    if repaired:
        _log.info("meld: repaired cp1252 artefacts in %d fields", repaired)
    return MeldUtterances(tuple(text), tuple(speaker), np.asarray(label, np.int64), repaired)


def _members(label: str) -> list[str]:
    return [p.strip() for p in re.split(r"\s+and\s+", label)]


def assign_speakers(
    speaker: tuple[str, ...], y: np.ndarray, num_sites: int, test_per_site: int, seed: int
) -> dict[str, tuple[int, bool]]:
    """``{speaker: (site, held out)}``: the scheme of the module docstring."""
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise ConfigError(f"invalid num_sites={num_sites!r}: expected a positive integer")
    if isinstance(test_per_site, bool) or not isinstance(test_per_site, int) or test_per_site < 1:
        raise ConfigError(f"invalid data.test_persons_per_site={test_per_site!r}: expected an integer >= 1")
    counts = Counter(speaker)
    main = sorted(s for s, n in counts.items() if n >= MAIN_MIN_UTTERANCES)
    joint = sorted(s for s in counts if s not in main and any(m in main for m in _members(s)))
    minor = sorted(s for s in counts if s not in main and s not in joint)
    per_class = {m: np.bincount(y[np.asarray(speaker) == m], minlength=len(CLASS_NAMES)) for m in main}
    eligible = [m for m in main if per_class[m].min() >= MIN_TEST_PER_CLASS]
    if not eligible:
        raise ConfigError(
            f"meld: no speaker with >= {MAIN_MIN_UTTERANCES} lines has >= {MIN_TEST_PER_CLASS} lines of "
            "every emotion, so no held-out speaker can cover every class; is this the full MELD release?"
        )
    if len(minor) < num_sites * (test_per_site + 1):
        raise ConfigError(
            f"invalid data.test_persons_per_site={test_per_site}: meld has {len(minor)} minor speakers, "
            f"but {num_sites} sites x (data.test_persons_per_site held out + 1 kept) need "
            f"{num_sites * (test_per_site + 1)}; lower data.test_persons_per_site or federation.num_clients"
        )
    rng = np.random.default_rng([seed, _ASSIGN_STREAM])
    test_main = eligible[int(rng.integers(len(eligible)))]
    sites = rng.permutation(num_sites)
    dealt = [m for m in rng.permutation(main).tolist() if m != test_main] + [test_main]
    out = {m: (int(sites[i % num_sites]), m == test_main) for i, m in enumerate(dealt)}
    for label in joint:  # held out if any of its main characters is, else at its first one's site
        mains = [m for m in _members(label) if m in main]
        out[label] = (out[mains[0]][0], any(out[m][1] for m in mains))
    tie = {s: i for i, s in enumerate(rng.permutation(minor).tolist())}
    by_size = sorted(minor, key=lambda s: (-counts[s], tie[s]))
    held: list[list[str]] = [[] for _ in range(num_sites)]
    for i, s in enumerate(by_size):
        lap, pos = divmod(i, num_sites)
        held[pos if lap % 2 == 0 else num_sites - 1 - pos].append(s)
    for site, group in enumerate(held):
        test = set(rng.choice(group, size=test_per_site, replace=False).tolist())
        out.update({s: (site, s in test) for s in group})
    return out


def _text_features(cfg: DataConfig, folder: Path, data: MeldUtterances) -> np.ndarray:
    """``x`` for every utterance: token ids ``(N, seq_len, 1)`` or MiniLM ``(N, 1, 384)``."""
    if cfg.text_encoder == "tokens":
        return encode_tokens(data.text, cfg.seq_len).astype(np.float32)[:, :, None]
    stats = [(n, file_digest(folder / n)) for n in SPLIT_FILES]  # content, not size+mtime
    blob = json.dumps([_CACHE_VERSION, stats, minilm_model_key()]).encode()
    key = f"minilm-{hashlib.sha256(blob).hexdigest()[:20]}"
    cache = cache_dir("meld")
    vectors = minilm_embeddings(data.text, key, cache)
    return vectors.reshape(len(data.text), 1, MINILM_DIM)


@register_dataset("meld", modalities=("text",))
def load_meld(cfg: DataConfig, num_sites: int, seed: int) -> DatasetSplit:
    """Train and held-out-speaker test utterances of MELD, speakers grouped into sites."""
    folder = resolve_root(cfg.root)
    data = read_meld(folder)
    x = _text_features(cfg, folder, data)
    where = assign_speakers(data.speaker, data.y, num_sites, cfg.test_persons_per_site, seed)
    person_id = {name: i for i, name in enumerate(sorted(where))}
    person = np.array([person_id[s] for s in data.speaker], np.int64)
    site = np.array([where[s][0] for s in data.speaker], np.int64)
    is_test = np.array([where[s][1] for s in data.speaker], bool)

    def build(rows: np.ndarray) -> MultimodalDataset:
        return MultimodalDataset(
            x=x[rows],
            mask=np.ones((len(rows), 1), bool),
            y=data.y[rows],
            person=person[rows],
            site=site[rows],
            modalities=MODALITIES,
            feature_slices=((0, x.shape[2]),),
            class_names=CLASS_NAMES,
        )

    split = DatasetSplit(train=build(np.flatnonzero(~is_test)), test=build(np.flatnonzero(is_test)))
    held_out = sorted({data.speaker[i] for i in np.flatnonzero(is_test)})
    _log.info(
        "meld: %d train / %d test utterances, %d speakers over %d sites; held out: %s",
        len(split.train),
        len(split.test),
        len(person_id),
        num_sites,
        ", ".join(held_out),
    )
    return split
