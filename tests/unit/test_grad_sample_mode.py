"""privacy.grad_sample_mode: every mode the config accepts gives hooks' update and hooks' spend.

How Opacus computes per-sample gradients is a matter of speed only: for the same seed (the same
Poisson batches and the same noise draw) each mode must clip to the same per-sample gradients and
take the same step, up to float rounding, and record the same accountant entry. The loss is
computed through the wrapped module (``SampleLosses``), which expanded weights need; an empty
Poisson batch (batch size 1 makes many) must still take hooks' pure-noise step.
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedmer import records as rk
from fedmer.config import (
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    PrivacyConfig,
)
from fedmer.data.base import MultimodalDataset
from fedmer.data.registry import load_client_dataset
from fedmer.data.synthetic import generate_synthetic
from fedmer.models import build_model_for
from fedmer.privacy.engine import PrivacyHistory, compute_epsilon, make_private
from fedmer.privacy.ledger import read_ledger
from fedmer.training.local import DPSGD, train_local
from fedmer.training.loops import SampleLosses, batch_losses, make_loader

FAST_MODES = [m for m in GRAD_SAMPLE_MODES if m != "hooks"]
#: The modes every model family and layout is checked with (functorch: the default model only, slow).
LAYOUT_MODES = ["bk", "ew"]
#: The model families (configs/model/) and modality dropout: every layer type the models use.
FAMILIES: dict[str, dict[str, object]] = {
    "attention": {},
    "late": {"fusion": "late"},
    "coattention": {"fusion": "coattention"},
    "memocmt": {"fusion": "transformer"},
    "mhlt": {"fusion": "gated", "intensity_weight": 0.5},
    "dcca": {"fusion": "concat", "aux_loss": "cca"},
    "joyful": {"aux_loss": "contrastive"},
    "gru": {"encoder": "gru"},
    "tzirakis": {"encoder": "crnn"},
    "functionals": {"encoder": "functionals", "fusion": "concat"},
    "linear": {"encoder": "functionals_linear", "fusion": "sum"},
    "modality_dropout": {"modality_dropout": 0.3},
}


@pytest.fixture(scope="module")
def data() -> MultimodalDataset:
    return generate_synthetic(DataConfig(persons_per_site=2, sequences_per_person=16), 2, 0).train


def _train(
    cfg: ExperimentConfig, data: MultimodalDataset, mode: str, *, noise: float, batch: int = 16
) -> tuple[dict[str, torch.Tensor], float, PrivacyHistory]:
    """One epoch of DP-SGD from the same initial model and seed; (weights, loss, history)."""
    torch.manual_seed(0)
    model = build_model_for(cfg, data)
    prior = PrivacyHistory(((1.3, 0.5, 4),))
    dp = DPSGD(noise, 1.0, history=prior, grad_sample_mode=mode)
    torch.manual_seed(1)  # the Poisson batches and the noise both draw from torch's global RNG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG advice
        out = train_local(model, data, epochs=1, lr=0.5, batch_size=batch, seed=7, dp=dp)
    return copy.deepcopy(model.state_dict()), out.train.loss, out.history


def _assert_same_update(
    mode: str, cfg: ExperimentConfig, data: MultimodalDataset, noise: float, batch: int
) -> None:
    ref, ref_loss, ref_history = _train(cfg, data, "hooks", noise=noise, batch=batch)
    got, loss, history = _train(cfg, data, mode, noise=noise, batch=batch)
    assert set(got) == set(ref)  # trained in place: the network's own keys, no wrapper prefix
    for key in ref:
        # Float rounding grows with the tensor's scale (batch 1, noise 1 drives weights to ~100):
        # the absolute tolerance is 1e-5, or a millionth of the tensor's largest entry.
        atol = max(1e-5, 1e-6 * float(ref[key].abs().max()))
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=atol, msg=f"{mode}: {key}")
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    # (a) the accounting: the same entry appended to the same resumed history, the same epsilon
    assert history == ref_history and history.entries[0] == (1.3, 0.5, 4)
    assert compute_epsilon(history, 1e-5) == compute_epsilon(ref_history, 1e-5)


@pytest.mark.parametrize("mode", FAST_MODES)
@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_the_default_model_takes_hooks_update_and_spend(
    data: MultimodalDataset, mode: str, noise: float
) -> None:
    """(b) noise 0: the clipped per-sample gradient sums agree; noise 1: and the same noise is drawn."""
    _assert_same_update(mode, ExperimentConfig(), data, noise, batch=16)


@pytest.mark.parametrize("mode", FAST_MODES)
def test_empty_poisson_batches_take_hooks_pure_noise_step(data: MultimodalDataset, mode: str) -> None:
    """Batch 1 over 32 samples: about a third of the Poisson batches are empty."""
    _assert_same_update(mode, ExperimentConfig(), data, 1.0, batch=1)


@pytest.mark.parametrize("mode", LAYOUT_MODES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_model_family_takes_hooks_update(data: MultimodalDataset, family: str, mode: str) -> None:
    model = ModelConfig(**{"hidden": 16, **FAMILIES[family]})  # type: ignore[arg-type]
    _assert_same_update(mode, replace(ExperimentConfig(), model=model), data, 1.0, batch=16)


@pytest.mark.parametrize("mode", LAYOUT_MODES)
@pytest.mark.parametrize("encoder", ["tcn", "gru", "crnn"])
def test_a_one_feature_modality_takes_hooks_update(encoder: str, mode: str) -> None:
    """Stress-Predict's layout: a one-channel convolution hands GroupNorm a channels-last tensor."""
    g = torch.Generator().manual_seed(0)
    n = 48
    data = MultimodalDataset(
        x=torch.randn(n, 12, 4, generator=g).numpy(), mask=torch.ones(n, 2, dtype=torch.bool).numpy(),
        y=torch.randint(0, 2, (n,), generator=g).numpy(), person=torch.arange(n).numpy(),
        site=torch.zeros(n, dtype=torch.int64).numpy(), modalities=("speech", "physio"),
        feature_slices=((0, 1), (1, 4)), class_names=("a", "b"),
    )  # fmt: skip
    cfg = replace(ExperimentConfig(), model=ModelConfig(encoder=encoder, hidden=8))
    _assert_same_update(mode, cfg, data, 1.0, batch=16)


@pytest.mark.parametrize("mode", LAYOUT_MODES)
@pytest.mark.parametrize("modalities", [("text",), ("speech", "text")])
def test_token_text_below_32_a_batch_takes_hooks_update(modalities: tuple[str, ...], mode: str) -> None:
    """MELD's layout under the auto recipe's small batches: torch's expanded-weights Conv1d takes
    its grouped path below 32 samples, which needs the (transposed) gradient contiguous."""
    g = torch.Generator().manual_seed(0)
    n, t = 64, 10
    ids = torch.randint(1, 4096, (n, t, 1), generator=g).float()
    ids[:, 7:] = 0  # padding
    x = torch.cat([torch.randn(n, t, 3, generator=g), ids], dim=2) if len(modalities) == 2 else ids
    slices = ((0, 3), (3, 4)) if len(modalities) == 2 else ((0, 1),)
    data = MultimodalDataset(
        x=x.numpy(), mask=torch.ones(n, len(modalities), dtype=torch.bool).numpy(),
        y=torch.randint(0, 3, (n,), generator=g).numpy(), person=torch.arange(n).numpy(),
        site=torch.zeros(n, dtype=torch.int64).numpy(), modalities=modalities,
        feature_slices=slices, class_names=("a", "b", "c"),
    )  # fmt: skip
    cfg = replace(ExperimentConfig(), model=ModelConfig(hidden=8))
    _assert_same_update(mode, cfg, data, 1.0, batch=16)


def test_an_empty_batch_sets_empty_grad_samples_and_no_forward(data: MultimodalDataset) -> None:
    torch.manual_seed(0)
    net = build_model_for(ExperimentConfig(), data)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup = make_private(
            SampleLosses(net), opt, make_loader(data, 8, 0), noise_multiplier=1.0, max_grad_norm=1.0,
            history=PrivacyHistory(), grad_sample_mode="ew",
        )  # fmt: skip
    empty = tuple(t[:0] for t in next(iter(make_loader(data, 8, 0))))
    losses = batch_losses(setup.module, empty)
    assert losses.shape == (0,)
    assert all(p.grad_sample.shape == (0, *p.shape) for p in net.parameters())  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["ghost", "Hooks", ""])
def test_the_config_accepts_only_the_supported_modes(bad: str) -> None:
    message = rf"invalid privacy\.grad_sample_mode='{bad}': expected one of {', '.join(GRAD_SAMPLE_MODES)}"
    with pytest.raises(ConfigError, match=message):
        PrivacyConfig(grad_sample_mode=bad)
    flat = ExperimentConfig().to_run_config() | {"privacy.grad_sample_mode": bad}
    with pytest.raises(ConfigError, match=r"privacy\.grad_sample_mode"):
        ExperimentConfig.from_run_config(flat)
    tiny = generate_synthetic(DataConfig(persons_per_site=1, sequences_per_person=4), 2, 0).train
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=rf"grad_sample_mode='{bad}'"):
        make_private(
            lin, torch.optim.SGD(lin.parameters(), lr=0.1), make_loader(tiny, 2, 0),
            noise_multiplier=1.0, max_grad_norm=1.0, history=PrivacyHistory(), grad_sample_mode=bad,
        )  # fmt: skip


def test_every_supported_mode_round_trips_the_run_config() -> None:
    assert DEFAULT_GRAD_SAMPLE_MODE in GRAD_SAMPLE_MODES
    for mode in GRAD_SAMPLE_MODES:
        cfg = ExperimentConfig(privacy=PrivacyConfig(grad_sample_mode=mode))
        assert ExperimentConfig.from_run_config(cfg.to_run_config()).privacy.grad_sample_mode == mode


def _client_round(mode: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict, object, list[str]]:
    """The real ClientApp train handler, one round on partition 0; (arrays, metrics, ledger, modes)."""
    from flwr.supercore.task_identity import TaskIdentity

    import fedmer.training.local as local
    from client.app import train

    used: list[str] = []
    real = make_private  # the engine's, not a spy a previous call left in place

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        used.append(kwargs["grad_sample_mode"])
        return real(*args, **kwargs)

    monkeypatch.setattr(local, "make_private", spy)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    out = tempfile.mkdtemp(prefix="fedmer-gsm-test-")
    flat = ExperimentConfig().to_run_config() | {
        "data.persons_per_site": 2, "data.sequences_per_person": 16, "federation.num_clients": 3,
        "privacy.grad_sample_mode": mode, "output.dir": out,
        "privacy.reply_metrics": "monitoring",  # the training loss too, to compare the two modes
    }  # fmt: skip
    cfg = ExperimentConfig.from_run_config(flat)
    torch.manual_seed(0)
    state = build_model_for(cfg, load_client_dataset(cfg, 0)).state_dict()
    config = ConfigRecord({rk.SERVER_ROUND: 1, rk.LR: 0.1, rk.LOCAL_EPOCHS: 2})
    msg = Message(RecordDict({rk.ARRAYS: ArrayRecord(state), rk.CONFIG: config}), dst_node_id=1,
                  message_type=MessageType.TRAIN)  # fmt: skip
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=flat)  # fmt: skip
    reply = train(msg, context)
    arrays = reply.content[rk.ARRAYS].to_torch_state_dict()
    return arrays, dict(reply.content[rk.METRICS]), read_ledger(f"{out}/ledgers/client-0.json"), used


@pytest.mark.parametrize("mode", LAYOUT_MODES)
def test_a_client_round_matches_hooks(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The ClientApp trains with the configured mode; update, epsilon and ledger entry are hooks'."""
    ref_arrays, ref_metrics, ref_ledger, ref_used = _client_round("hooks", monkeypatch)
    arrays, metrics, ledger, used = _client_round(mode, monkeypatch)
    assert (ref_used, used) == (["hooks"], [mode])
    for key in ref_arrays:
        torch.testing.assert_close(arrays[key], ref_arrays[key], rtol=1e-4, atol=1e-5, msg=key)
    for key in (rk.EPSILON, rk.EPSILON_LIFETIME, rk.NOISE_MULTIPLIER, rk.STEPS, rk.NUM_EXAMPLES):
        assert metrics[key] == ref_metrics[key], key
    assert math.isfinite(metrics[rk.EPSILON]) and metrics[rk.STEPS] > 0
    assert metrics[rk.TRAIN_LOSS] == pytest.approx(ref_metrics[rk.TRAIN_LOSS], rel=1e-5)
    assert ledger.history.entries == ref_ledger.history.entries  # type: ignore[attr-defined]
