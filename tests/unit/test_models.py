"""Every encoder x fusion pair: shapes, Opacus validity, per-sample grads, mask semantics."""

from __future__ import annotations

import dataclasses
import itertools
import pickle
import types

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedmer import config
from fedmer.config import ConfigError, ModelConfig
from fedmer.models import (
    ENCODERS,
    FUSIONS,
    MultimodalEmotionNet,
    build_encoder,
    build_fusion,
    build_model,
    count_parameters,
)
from tests.conftest import dp_sgd_setup

# Opacus' hooks on a model whose inputs need no grad: expected, harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

SLICES: tuple[tuple[int, int], ...] = ((0, 16), (16, 26), (26, 28), (28, 32))
NUM_F = 32
NUM_M = len(SLICES)
NUM_C = 4
T = 8
COMBOS = list(itertools.product(sorted(ENCODERS), sorted(FUSIONS)))
COMBO_IDS = [f"{e}-{f}" for e, f in COMBOS]


def _model(encoder: str, fusion: str, hidden: int = 16, seed: int = 0) -> MultimodalEmotionNet:
    torch.manual_seed(seed)
    return build_model(ModelConfig(encoder=encoder, fusion=fusion, hidden=hidden), SLICES, NUM_C)


def _batch(n: int = 8, t: int = T, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed batch; absent modalities zeroed like MultimodalDataset.with_mask does."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, NUM_F, generator=g)
    mask = (torch.rand(n, NUM_M, generator=g) > 0.3).float()
    mask[0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    mask[1] = 0.0  # a sample with every sensor missing
    for m, (a, b) in enumerate(SLICES):
        x[mask[:, m] == 0, :, a:b] = 0.0
    y = torch.randint(0, NUM_C, (n,), generator=g)
    return x, mask, y


def test_config_accepts_exactly_what_the_model_registries_hold() -> None:
    for name in ENCODERS:
        assert config.ModelConfig(encoder=name).encoder == name
    for name in FUSIONS:
        assert config.ModelConfig(fusion=name).fusion == name
    with pytest.raises(config.ConfigError, match=r"model.fusion='mine'.*attention"):
        config.ModelConfig(fusion="mine")
    FUSIONS.register("mine", FUSIONS["concat"])
    try:
        assert config.ModelConfig(fusion="mine").fusion == "mine"
    finally:
        FUSIONS._entries.pop("mine")


@pytest.mark.parametrize(("encoder", "fusion"), COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("t", [4, 5, T])
def test_output_shape(encoder: str, fusion: str, t: int) -> None:
    x, mask, _ = _batch(t=t)
    out = _model(encoder, fusion)(x, mask)
    assert out.shape == (x.shape[0], NUM_C)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("encoder", "fusion"), COMBOS, ids=COMBO_IDS)
def test_opacus_validator_accepts_model(encoder: str, fusion: str) -> None:
    assert ModuleValidator.validate(_model(encoder, fusion), strict=True) == []


@pytest.mark.parametrize(("encoder", "fusion"), COMBOS, ids=COMBO_IDS)
def test_dp_sgd_step_with_poisson_sampling(encoder: str, fusion: str) -> None:
    model = _model(encoder, fusion)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    private, optimizer, loader = dp_sgd_setup(model, _batch(n=32), batch_size=8)
    xb, mb, yb = next(b for b in loader if len(b[2]) > 0)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(private(xb, mb), yb).backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, f"no per-sample grad for {name}"
        assert p.grad_sample.shape == (len(yb), *p.shape), name
    optimizer.step()
    after = model.state_dict()
    assert not any(k.startswith("_module.") for k in after)
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("encoder", "fusion"), COMBOS, ids=COMBO_IDS)
def test_per_sample_grads_match_individual_backward(encoder: str, fusion: str) -> None:
    """Opacus' hooks must see every parameter use (expanded Embedding index, einsums, DPGRU)."""
    model = _model(encoder, fusion, hidden=8)
    x, mask, y = _batch(n=4)
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(x, mask), y, reduction="sum").backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    gsm.zero_grad(set_to_none=True)
    gsm.disable_hooks()
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[i : i + 1], mask[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            expected = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(per_sample[n][i], expected, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize(("encoder", "fusion"), COMBOS, ids=COMBO_IDS)
def test_masked_modality_values_do_not_matter(encoder: str, fusion: str) -> None:
    model = _model(encoder, fusion)
    x, mask, _ = _batch()
    noisy = x.clone()
    for m, (a, b) in enumerate(SLICES):
        absent = mask[:, m] == 0
        noisy[absent, :, a:b] = 100.0 * torch.randn(int(absent.sum()), x.shape[1], b - a)
    assert not torch.equal(noisy, x)
    with torch.no_grad():
        assert torch.equal(model(x, mask), model(noisy, mask))


@pytest.mark.parametrize(("encoder", "fusion"), COMBOS, ids=COMBO_IDS)
def test_all_missing_gives_finite_output_and_grads(encoder: str, fusion: str) -> None:
    model = _model(encoder, fusion)
    x, _, y = _batch()
    mask = torch.zeros(x.shape[0], NUM_M)
    out = model(x, mask)
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_attention_weights_zero_for_absent_modalities() -> None:
    model = _model("tcn", "attention")
    x, mask, _ = _batch(n=16)
    w = model.modality_weights(x, mask)
    assert w is not None and w.shape == mask.shape
    assert torch.all(w[mask == 0] == 0.0)
    assert torch.all(w[mask == 1] > 0.0)
    present = mask.sum(1) > 0
    torch.testing.assert_close(w[present].sum(1), torch.ones(int(present.sum())))
    assert torch.all(w[~present] == 0.0)


def test_modality_weights_for_other_fusions() -> None:
    x, mask, _ = _batch()
    assert _model("tcn", "concat").modality_weights(x, mask) is None
    w = _model("tcn", "late").modality_weights(x, mask)
    assert w is not None
    expected = mask / mask.sum(1, keepdim=True).clamp(min=1.0)
    torch.testing.assert_close(w, expected)


def test_bool_and_float_masks_agree() -> None:
    model = _model("tcn", "attention")
    x, mask, _ = _batch()
    with torch.no_grad():
        assert torch.equal(model(x, mask), model(x, mask.bool()))


@pytest.mark.parametrize(("encoder", "fusion"), COMBOS, ids=COMBO_IDS)
def test_seeded_build_is_deterministic(encoder: str, fusion: str) -> None:
    a, b = _model(encoder, fusion, seed=7), _model(encoder, fusion, seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x, mask, _ = _batch()
    with torch.no_grad():
        assert torch.equal(a(x, mask), b(x, mask))


@pytest.mark.parametrize(("encoder", "fusion"), COMBOS, ids=COMBO_IDS)
def test_parameter_budget(encoder: str, fusion: str) -> None:
    """Small on purpose: DP-SGD noise norm grows with sqrt(#params); crnn + cross-modal fusion is largest."""
    n = count_parameters(_model(encoder, fusion, hidden=32))
    low = 2_000 if encoder.startswith("functionals") else 10_000  # functionals: one linear map per modality
    low = 1_000 if encoder == "means_linear" else low  # means only: half the functionals
    if fusion == "sum":  # logit-summing fusion: encoders as wide as the classes, model.hidden unused
        low = 100  # means_linear + sum: (F_m + 1) x classes per modality
    assert low <= n <= 50_000, n


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ConfigError, match="crnn, functionals, functionals_linear, gru, means_linear, tcn"):
        build_encoder("lstm", 4, 8)
    with pytest.raises(ConfigError, match="attention, coattention, concat, gated, late, sum, transformer"):
        build_fusion("bilinear", 2, 8, 3)
    bad = types.SimpleNamespace(**{**dataclasses.asdict(ModelConfig(hidden=8)), "fusion": "bilinear"})
    with pytest.raises(ConfigError, match=r"model\.fusion"):
        build_model(bad, SLICES, NUM_C)  # type: ignore[arg-type]


def test_input_shape_errors_are_explicit() -> None:
    model = _model("tcn", "concat")
    x, mask, _ = _batch()
    with pytest.raises(ValueError, match="mask"):
        model(x, mask[:, :2])
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :, :10], mask)


@pytest.mark.parametrize(("encoder", "fusion"), COMBOS, ids=COMBO_IDS)
def test_empty_poisson_batch_runs(encoder: str, fusion: str) -> None:
    """Poisson sampling can draw an empty batch; the DP step must still go through."""
    model = _model(encoder, fusion)
    x, mask, _ = _batch()
    gsm = GradSampleModule(model)
    out = gsm(x[:0], mask[:0])
    assert out.shape == (0, NUM_C)
    (out.sum() * 0.0).backward()
    assert all(p.grad_sample is not None for p in model.parameters())


@pytest.mark.parametrize(("encoder", "fusion"), COMBOS, ids=COMBO_IDS)
def test_state_dict_lists_each_parameter_once_and_round_trips(encoder: str, fusion: str) -> None:
    """What Flower ships: no DPGRU aliases (double-counted norms), strict reload, picklable."""
    model = _model(encoder, fusion)
    state = model.state_dict()
    params = [name for name, _ in model.named_parameters()]
    assert [k for k in state if k in set(params)] == params
    extra = [k for k in state if k not in set(params)]  # persistent buffers: functionals' standardisation
    assert all(k.rsplit(".", 1)[1] in ("shift", "scale") for k in extra), extra
    assert sum(state[k].numel() for k in params) == count_parameters(model)
    other = _model(encoder, fusion, seed=99)
    other.load_state_dict(state, strict=True)
    x, mask, _ = _batch()
    with torch.no_grad():
        assert torch.equal(model(x, mask), other(x, mask))
    clone = pickle.loads(pickle.dumps(model))
    assert list(clone.state_dict()) == list(state)
