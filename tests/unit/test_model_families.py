"""The model families of configs/model/: each is a config switch, DP-trainable, mask-honest, learns.

Every family is composed from its real yaml (so the test breaks if a yaml drifts), then run
through Opacus' validator, a Poisson-sampled DP-SGD step on the full objective (category,
intensity, auxiliary), a per-sample-gradient check against one-sample backward passes, and
a toy task it must learn. Intensity head and modality dropout get their own checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedmer.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig
from fedmer.data.base import MultimodalDataset
from fedmer.data.synthetic import INTENSITY_NAMES, generate_synthetic
from fedmer.models import FUSIONS, MultimodalEmotionNet, build_model, build_model_for
from fedmer.training.loops import batch_losses, evaluate_model, make_loader, predict, train_epochs
from simulations.run import experiment_from_hydra
from tests.conftest import compose, dp_sgd_setup

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

SLICES: tuple[tuple[int, int], ...] = ((0, 6), (6, 10), (10, 12), (12, 16))
NUM_F, NUM_M, NUM_C, NUM_K, T = 16, 4, 3, 2, 8
#: The yaml of each family under configs/model/ (feature_fusion = concat, decision = late).
FAMILIES = ["tzirakis", "dcca", "coattention", "memocmt", "mhlt", "joyful", "concat", "late", "linear"]
NEW_FUSIONS = ["coattention", "transformer", "gated"]


def _family(name: str, **override: object) -> ModelConfig:
    """``model.*`` of the composed config ``model=<name>`` (hidden 16 to keep tests fast)."""
    cfg = experiment_from_hydra(compose([f"model={name}"])).model
    return ModelConfig(**{**cfg.__dict__, "hidden": 16, **override})


def _net(cfg: ModelConfig, seed: int = 0) -> MultimodalEmotionNet:
    torch.manual_seed(seed)
    return build_model(cfg, SLICES, NUM_C, intensity_classes=NUM_K)


def _batch(n: int = 12, seed: int = 1, signal: float = 0.0) -> tuple[torch.Tensor, ...]:
    """Packed batch with absent modalities zeroed, an all-missing row and partial intensity labels.

    With ``signal > 0`` every present modality carries a class-dependent offset (a toy task).
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_C, (n,), generator=g)
    x = torch.randn(n, T, NUM_F, generator=g)
    x += signal * torch.nn.functional.one_hot(y, NUM_C).float().repeat(1, 6)[:, None, :NUM_F]
    mask = (torch.rand(n, NUM_M, generator=g) > 0.25).float()
    mask[0] = 0.0
    mask[1] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    for m, (a, b) in enumerate(SLICES):
        x[mask[:, m] == 0, :, a:b] = 0.0
    intensity = torch.randint(0, NUM_K, (n,), generator=g)
    intensity[::3] = -1  # unlabelled samples
    return x, mask, y, intensity


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_a_config_switch_and_passes_the_validator(family: str) -> None:
    cfg = _family(family)
    model = _net(cfg)
    assert ModuleValidator.validate(model, strict=True) == []
    assert (cfg.aux_loss != "none") == (model.aux is not None)
    assert (cfg.intensity_weight > 0) == (model.intensity_classes == NUM_K)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("family", FAMILIES)
def test_dp_sgd_step_on_the_full_objective(family: str, dropout: float) -> None:
    """make_private + one Poisson step: every parameter gets a finite grad sample and moves."""
    model = _net(_family(family, modality_dropout=dropout))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    private, optimizer, loader = dp_sgd_setup(model, _batch(n=48), batch_size=12)
    batch = next(b for b in loader if len(b[2]) > 0)
    optimizer.zero_grad()
    batch_losses(private, batch).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, f"no per-sample grad for {name}"
        assert p.grad_sample.shape == (len(batch[2]), *p.shape), name
        assert torch.isfinite(p.grad_sample).all(), name
    optimizer.step()
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_grads_of_the_full_objective_match_one_sample_backward(family: str) -> None:
    """Opacus must see every use of every parameter: aux projections, prototypes, intensity columns."""
    model = _net(_family(family))
    x, mask, y, intensity = _batch(n=5)
    gsm = GradSampleModule(model, loss_reduction="sum")
    batch_losses(gsm, (x, mask, y, intensity)).sum().backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    gsm.zero_grad(set_to_none=True)
    gsm.disable_hooks()
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        model.sample_losses(
            x[i : i + 1], mask[i : i + 1], y[i : i + 1], intensity[i : i + 1]
        ).sum().backward()
        for n, p in model.named_parameters():
            expected = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(per_sample[n][i], expected, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_learns_a_toy_task_under_sgd(family: str) -> None:
    """40 full-batch SGD steps on a separable task: the training objective falls by half."""
    model = _net(_family(family))
    batch = _batch(n=96, seed=5, signal=1.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    start = float(batch_losses(model, batch).mean().detach())
    for _ in range(40):
        optimizer.zero_grad()
        batch_losses(model, batch).mean().backward()
        optimizer.step()
    end = float(batch_losses(model, batch).mean().detach())
    assert end < 0.5 * start, (start, end)


@pytest.mark.parametrize("fusion", NEW_FUSIONS)
def test_nan_in_absent_modality_changes_nothing(fusion: str) -> None:
    model = _net(ModelConfig(fusion=fusion, hidden=16, aux_loss="cca", intensity_weight=0.5))
    x, mask, y, intensity = _batch()
    poisoned = x.clone()
    for m, (a, b) in enumerate(SLICES):
        poisoned[mask[:, m] == 0, :, a:b] = float("nan")
    model.eval()
    with torch.no_grad():
        clean, dirty = model.outputs(x, mask), model.outputs(poisoned, mask)
        assert torch.isfinite(dirty.logits).all()
        assert torch.equal(clean.logits, dirty.logits)
        assert torch.equal(clean.intensity_logits, dirty.intensity_logits)
        assert torch.equal(
            model.sample_losses(x, mask, y, intensity), model.sample_losses(poisoned, mask, y, intensity)
        )
    loss = model.sample_losses(poisoned, mask, y, intensity).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("fusion", NEW_FUSIONS)
def test_new_fusion_weights_are_a_distribution_over_present_modalities(fusion: str) -> None:
    model = _net(ModelConfig(fusion=fusion, hidden=16))
    x, mask, _, _ = _batch(n=16)
    w = model.modality_weights(x, mask)
    assert w is not None and w.shape == mask.shape
    assert torch.all(w[mask == 0] == 0.0)
    assert torch.all(w[mask == 1] > 0.0)
    present = mask.sum(1) > 0
    torch.testing.assert_close(w[present].sum(1), torch.ones(int(present.sum())))
    assert torch.all(w[~present] == 0.0)


def test_transformer_tokens_attend_only_to_other_present_modalities() -> None:
    """A modality's context comes from other present modalities only: alone, it gets none."""
    model = _net(ModelConfig(fusion="transformer", hidden=16))
    fusion = model.fusion
    h = torch.randn(3, NUM_M, 16)
    present = torch.tensor([[True, True, False, True], [True, False, False, False], [False] * 4])
    context, attn = fusion.cross(fusion.tokens(h, present), present)
    assert torch.all(attn.diagonal(dim1=1, dim2=2) == 0.0)
    assert torch.all(attn[:, :, ~present[0]][0] == 0.0)
    assert torch.all(attn[1][0] == 0.0)  # the only present modality has no other to attend to
    assert torch.all(attn[1][:, 1:] == 0.0) and torch.all(attn[2] == 0.0)  # absent keys are never read
    torch.testing.assert_close(attn[0][:, present[0]].sum(-1), torch.ones(NUM_M))
    # no key to attend to: the context is the output projection of zero (its bias)
    torch.testing.assert_close(context[1, 0], fusion.cross.out.bias)


# ---- intensity head --------------------------------------------------------------------------


def test_intensity_head_shape_and_absence() -> None:
    x, mask, _, _ = _batch()
    with_head = _net(ModelConfig(fusion="gated", hidden=16, intensity_weight=0.5))
    out = with_head.outputs(x, mask)
    assert out.logits.shape == (len(x), NUM_C) and out.intensity_logits.shape == (len(x), NUM_K)
    assert torch.equal(with_head(x, mask), out.logits)  # forward keeps returning category logits
    without = _net(ModelConfig(fusion="gated", hidden=16, intensity_weight=0.0))
    assert without.outputs(x, mask).intensity_logits is None
    assert without.fusion.num_outputs == NUM_C  # no intensity parameter exists at weight 0
    extra = sum(p.numel() for p in with_head.parameters()) - sum(p.numel() for p in without.parameters())
    assert extra == NUM_K * (16 + 1)  # K more rows in the final Linear, nothing else


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_intensity_head_exists_for_every_fusion(fusion: str) -> None:
    model = _net(ModelConfig(fusion=fusion, hidden=16, intensity_weight=1.0))
    x, mask, _, _ = _batch()
    out = model.outputs(x, mask)
    assert out.intensity_logits is not None and out.intensity_logits.shape == (len(x), NUM_K)
    assert torch.isfinite(out.intensity_logits).all()


def _unlabelled(data: MultimodalDataset) -> MultimodalDataset:
    return MultimodalDataset(**{**data.__dict__, "intensity": None, "intensity_names": ()})


def test_intensity_weight_on_a_dataset_without_labels_names_both_keys() -> None:
    cfg = ExperimentConfig(model=ModelConfig(fusion="gated", intensity_weight=0.5))
    data = _unlabelled(generate_synthetic(DataConfig(persons_per_site=1, sequences_per_person=10), 2, 0).test)
    with pytest.raises(ConfigError, match=r"model\.intensity_weight=0\.5.*data\.name='synthetic'"):
        build_model_for(cfg, data)
    with pytest.raises(ConfigError, match=r"model\.intensity_weight"):
        build_model(cfg.model, data.feature_slices, data.num_classes)
    off = ExperimentConfig(model=ModelConfig(fusion="gated", intensity_weight=0.0))
    assert build_model_for(off, data).intensity_classes == 0


def test_synthetic_data_carries_balanced_intensity_labels() -> None:
    split = generate_synthetic(DataConfig(persons_per_site=2, sequences_per_person=40), 3, 0)
    for part in (split.train, split.test):
        assert part.intensity_names == INTENSITY_NAMES
        assert set(np.unique(part.intensity)) == {0, 1}
    assert 0.35 < split.train.intensity.mean() < 0.65


def test_intensity_is_learned_and_reported_in_federated_training_path() -> None:
    """make_loader carries intensity labels, train_epochs uses them, evaluate_model reports them.

    The synthetic intensity cue is weak next to the emotion cue (one seed's run lands anywhere
    from 0.54 to 0.73 here), so the test reads the mean of three seeds (chance 0.5).
    """
    data = generate_synthetic(DataConfig(persons_per_site=4, sequences_per_person=60), 2, 0).train
    cfg = ExperimentConfig(model=ModelConfig(fusion="gated", intensity_weight=3.0, hidden=16))
    scores = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model_for(cfg, data)
        assert evaluate_model(model, data)["intensity_labelled"] == len(data)
        loader = make_loader(data, 32, seed=seed)
        assert len(next(iter(loader))) == 4
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        train_epochs(model, loader, optimizer, 12)
        report = evaluate_model(model, data)
        assert {"intensity_accuracy", "intensity_macro_f1"} <= set(report)
        scores.append(report["intensity_uar"])
    assert sum(scores) / len(scores) > 0.6, scores
    plain = build_model_for(ExperimentConfig(model=ModelConfig(hidden=16)), data)
    assert not any(k.startswith("intensity") for k in evaluate_model(plain, data))


# ---- modality dropout -------------------------------------------------------------------------


def test_modality_dropout_only_in_train_mode_and_at_its_rate() -> None:
    p = 0.3
    model = _net(ModelConfig(hidden=16, modality_dropout=p))
    reference = _net(ModelConfig(hidden=16))
    reference.load_state_dict(model.state_dict())
    x, mask, _, _ = _batch(n=64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, mask), reference(x, mask))
        assert torch.equal(model.outputs(x, mask).present, mask.bool())
    model.train()
    big = torch.ones(5000, NUM_M, dtype=torch.bool)
    big[::2, 1] = False  # absent entries must stay absent
    torch.manual_seed(0)
    kept = model.drop_modalities(big)
    assert not torch.any(kept & ~big)
    n = int(big.sum())
    dropped = int((big & ~kept).sum())
    sd = math.sqrt(n * p * (1 - p))
    assert abs(dropped - n * p) < 5 * sd, (dropped, n * p, sd)
    # independent per sample and modality: the drop rate of modality 0 given modality 2 dropped is p too
    given = ~kept[:, 2]
    assert abs(float((~kept[given, 0]).float().mean()) - p) < 5 * math.sqrt(p * (1 - p) / int(given.sum()))


def test_modality_dropout_acts_like_the_sensor_being_absent_and_is_reproducible() -> None:
    model = _net(ModelConfig(hidden=16, fusion="gated", modality_dropout=0.5))
    x, mask, _, _ = _batch(n=32)
    model.train()
    torch.manual_seed(11)
    out = model.outputs(x, mask)
    torch.manual_seed(11)
    again = model.outputs(x, mask)
    assert torch.equal(out.present, again.present) and torch.equal(out.logits, again.logits)
    assert not torch.equal(out.present, mask.bool())  # something was dropped
    model.eval()
    with torch.no_grad():
        # same logits as an eval pass where the dropped sensors never recorded (columns zeroed)
        absent = x.clone()
        for m, (a, b) in enumerate(SLICES):
            absent[~out.present[:, m], :, a:b] = 0.0
        torch.testing.assert_close(model(absent, out.present.float()), out.logits.detach())


def test_modality_dropout_leaves_evaluation_alone() -> None:
    data = generate_synthetic(DataConfig(persons_per_site=1, sequences_per_person=20), 2, 0).test
    dropping = build_model_for(ExperimentConfig(model=ModelConfig(hidden=16, modality_dropout=0.5)), data)
    plain = build_model_for(ExperimentConfig(model=ModelConfig(hidden=16)), data)
    plain.load_state_dict(dropping.state_dict())
    dropping.train()  # predict must switch it to eval
    a, b = predict(dropping, data), predict(plain, data)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
