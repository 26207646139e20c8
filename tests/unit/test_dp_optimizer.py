"""SummedLossDPOptimizer: a summed loss and one division give Opacus' own ``mean`` DP-SGD step.

FedMER's DP-SGD backpropagates the sum of the per-sample losses through a wrapper built with
``loss_reduction="sum"`` and divides once in the optimizer, instead of Opacus' ``mean`` path
(every per-sample gradient scaled by the batch size, the noised sum divided back). These tests
pin that it is the same training: the clipped sum of any per-sample gradients, the update of a
whole epoch for every ``grad_sample_mode`` (with and without noise, empty Poisson batches
included) and the accountant's entries.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
from torch import nn

from fedmer.config import GRAD_SAMPLE_MODES, DataConfig, ExperimentConfig
from fedmer.data.base import MultimodalDataset
from fedmer.data.synthetic import generate_synthetic
from fedmer.models import build_model_for
from fedmer.privacy.bk_dpsgd import BOOKKEEPING_MODE
from fedmer.privacy.dp_optimizer import LOSS_REDUCTION, SummedLossDPOptimizer
from fedmer.privacy.engine import PrivacyHistory, make_private
from fedmer.training.loops import SampleLosses, batch_losses, make_loader, reduce_losses, train_epochs

#: Opacus' own per-sample-gradient modes, the ones with a ``mean`` path to compare with (book-keeping
#: is FedMER's and is compared with hooks in test_grad_sample_mode.py).
OPACUS_MODES = [m for m in GRAD_SAMPLE_MODES if m != BOOKKEEPING_MODE]


@pytest.fixture(scope="module")
def data() -> MultimodalDataset:
    return generate_synthetic(DataConfig(persons_per_site=2, sequences_per_person=16), 2, 0).train


def _params(shapes: list[tuple[int, ...]]) -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(s)) for s in shapes]


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4),
    batch=st.integers(1, 9),
    max_norm=st.floats(0.01, 10.0),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_the_clipped_sum_is_opacus_flat_clipping(
    shapes: list[tuple[int, ...]], batch: int, max_norm: float, scale: float, seed: int
) -> None:
    """Any per-sample gradients: the same per-sample clip factors and the same clipped sum as Opacus."""
    g = torch.Generator().manual_seed(seed)
    samples = [torch.randn((batch, *s), generator=g) * scale for s in shapes]
    sums = []
    for cls in (DPOptimizer, SummedLossDPOptimizer):
        params = _params(shapes)
        for p, gs in zip(params, samples, strict=True):
            p.grad_sample = gs.clone()  # type: ignore[attr-defined]
        opt = cls(
            torch.optim.SGD(params, lr=1.0),
            noise_multiplier=0.0,
            max_grad_norm=max_norm,
            expected_batch_size=4,
        )
        opt.clip_and_accumulate()
        sums.append([p.summed_grad for p in params])  # type: ignore[attr-defined]
    for ours, theirs in zip(sums[1], sums[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * max_norm)
    # and every clipped sample is within the bound: the sum of B clipped samples is at most B*C
    total = torch.sqrt(sum((s**2).sum() for s in sums[1]))
    assert float(total) <= batch * max_norm * (1 + 1e-5)


def test_an_empty_batch_and_accumulated_batches_take_opacus_path() -> None:
    params = _params([(2, 3)])
    params[0].grad_sample = torch.zeros(0, 2, 3)  # type: ignore[attr-defined]
    opt = SummedLossDPOptimizer(
        torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4
    )
    opt.clip_and_accumulate()
    assert torch.equal(params[0].summed_grad, torch.zeros(2, 3))  # type: ignore[attr-defined]
    params = _params([(3,)])
    params[0].grad_sample = [torch.ones(2, 3), torch.ones(1, 3)]  # type: ignore[attr-defined]
    opt = SummedLossDPOptimizer(
        torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4
    )
    opt.clip_and_accumulate()
    torch.testing.assert_close(params[0].summed_grad, torch.full((3,), 3 / np.sqrt(3)))  # type: ignore[attr-defined]


def test_it_replaces_only_opacus_flat_optimizer_and_keeps_the_accountant_hook(
    data: MultimodalDataset,
) -> None:
    net = nn.Linear(3, 2)
    per_layer = DPPerLayerOptimizer(
        torch.optim.SGD(net.parameters(), lr=1.0),
        noise_multiplier=1.0,
        max_grad_norm=[1.0, 1.0],
        expected_batch_size=4,
    )
    with pytest.raises(TypeError, match="DPPerLayerOptimizer"):
        SummedLossDPOptimizer.replacing(per_layer)
    no_batch = DPOptimizer(
        torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=None, loss_reduction="sum",
    )  # fmt: skip
    with pytest.raises(ValueError, match="expected batch size"):
        SummedLossDPOptimizer.replacing(no_batch)
    torch.manual_seed(0)
    model = build_model_for(ExperimentConfig(), data)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup = make_private(
            SampleLosses(model), opt, make_loader(data, 16, 0), noise_multiplier=1.0, max_grad_norm=1.0,
            history=PrivacyHistory(((2.0, 0.5, 3),)), grad_sample_mode="ew",
        )  # fmt: skip
    assert type(setup.optimizer) is SummedLossDPOptimizer
    assert setup.module.loss_reduction == LOSS_REDUCTION == "sum"  # type: ignore[comparison-overlap]
    assert setup.optimizer.original_optimizer is opt
    train_epochs(setup.module, setup.loader, setup.optimizer, 1)
    steps = len(setup.loader)
    assert setup.history().entries == ((2.0, 0.5, 3), (1.0, 1 / steps, steps))


def test_reduce_losses_follows_the_wrapper() -> None:
    losses = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    assert float(reduce_losses(nn.Linear(1, 1), losses).detach()) == 3.0
    wrapped = nn.Linear(1, 1)
    wrapped.loss_reduction = "sum"  # what Opacus' wrappers carry
    assert float(reduce_losses(wrapped, losses).detach()) == 9.0
    empty = reduce_losses(wrapped, torch.zeros(0, requires_grad=True))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def _epoch(data: MultimodalDataset, mode: str, noise: float, batch: int, ours: bool) -> tuple[dict, tuple]:
    """One DP-SGD epoch from the same model and seed; FedMER's set-up or Opacus' own mean path."""
    torch.manual_seed(0)
    model = build_model_for(ExperimentConfig(), data)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loader = make_loader(data, batch, 7)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ours:
            setup = make_private(
                SampleLosses(model), opt, loader, noise_multiplier=noise, max_grad_norm=1.0,
                history=PrivacyHistory(), grad_sample_mode=mode,
            )  # fmt: skip
            wrapped, dp_opt, dp_loader, history = setup.module, setup.optimizer, setup.loader, setup.history
        else:
            engine = PrivacyEngine()
            wrapped, dp_opt, dp_loader = engine.make_private(
                module=SampleLosses(model), optimizer=opt, data_loader=loader, noise_multiplier=noise,
                max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode=mode, loss_reduction="mean",
            )  # fmt: skip
            assert type(dp_opt) is DPOptimizer

            def history() -> PrivacyHistory:
                return PrivacyHistory(tuple(tuple(e) for e in engine.accountant.history))

        for b in dp_loader:
            dp_opt.zero_grad(set_to_none=True)
            losses = batch_losses(wrapped, b)
            (
                reduce_losses(wrapped, losses)
                if ours
                else (losses.mean() if len(losses) else losses.sum() * 0)
            ).backward()
            dp_opt.step()
    return copy.deepcopy(model.state_dict()), history().entries


@pytest.mark.parametrize("mode", OPACUS_MODES)
@pytest.mark.parametrize(("noise", "batch"), [(0.0, 16), (1.0, 16), (1.0, 1)])
def test_an_epoch_is_opacus_mean_step(data: MultimodalDataset, mode: str, noise: float, batch: int) -> None:
    """Same weights (float rounding) and the same accountant entries; batch 1 makes empty Poisson batches."""
    ours, ours_history = _epoch(data, mode, noise, batch, ours=True)
    theirs, their_history = _epoch(data, mode, noise, batch, ours=False)
    assert ours_history == their_history
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch.manual_seed(0)
    start = build_model_for(ExperimentConfig(), data).state_dict()
    assert any(not torch.allclose(ours[k], v) for k, v in start.items())  # the epoch did train
