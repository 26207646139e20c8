"""Book-keeping DP-SGD (grad_sample_mode="bk"): each sample's norm and the clipped sum, exactly.

The ground truth here is the definition: each sample's gradient computed on its own (one
backward per sample), clipped with Opacus' factor ``min(1, C / (norm + 1e-6))`` and summed.
Every layer rule (FedMER's Gram-matrix and materialised routes, normalisation layers,
embeddings with and without ``padding_idx``, several calls of one layer, Opacus' samplers as the
fallback) must give that sum for random shapes and inputs; an underestimated norm would clip too
little, which is a privacy bug, not a rounding one. Whole epochs against hooks, for every model
family, are in ``test_grad_sample_mode.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from fedmer.privacy.bk_dpsgd import BookkeepingModule
from fedmer.privacy.engine import PrivacyHistory, make_private
from fedmer.privacy.ghost_norms import layer_clip, trained_of
from fedmer.training.loops import backpropagate, make_loader


class _Net(nn.Module):
    """``layer`` applied ``calls`` times (shared weights), then a fixed nonlinear per-sample loss."""

    def __init__(self, layer: nn.Module, calls: int, seed: int) -> None:
        super().__init__()
        self.layer, self.calls, self.seed = layer, calls, seed

    def forward(self, x: Tensor) -> Tensor:
        out = sum(self.layer(x) for _ in range(self.calls)) if self.calls > 1 else self.layer(x)
        assert isinstance(out, Tensor)
        g = torch.Generator().manual_seed(self.seed)
        w = torch.randn(out.shape[1:], generator=g)
        return torch.tanh(out * w).reshape(len(out), -1).sum(1)  # per-sample losses (B,)


def _truth(net: _Net, x: Tensor, params: list[nn.Parameter], max_norm: float) -> tuple[Tensor, list[Tensor]]:
    """Per-sample norms and Opacus' clipped sum, from one backward per sample."""
    grads = [torch.autograd.grad(net(x[i : i + 1]).sum(), params, allow_unused=True) for i in range(len(x))]
    grads = [
        [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)] for gs in grads
    ]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in grads])  # type: ignore[arg-type]
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    sums = [sum(f * gs[j] for f, gs in zip(factor, grads, strict=True)) for j in range(len(params))]
    return norms, sums  # type: ignore[return-value]


def _bookkeeping(
    net: _Net, x: Tensor, params: list[nn.Parameter], max_norm: float
) -> tuple[Tensor, list[Tensor]]:
    """Book-keeping's per-sample norms (its layer rules) and its clipped sums."""
    wrapped = BookkeepingModule(net)
    wrapped.backward(wrapped(x).sum())
    assert wrapped._calls is not None
    trained = frozenset(id(p) for p in params)
    sq = sum(layer_clip(m, c, trained_of(m, trained)).sq_norms for m, c in wrapped._calls.items())
    sums = wrapped.clipped_sums(params, max_norm)
    wrapped.remove_hooks()
    return torch.as_tensor(sq).clamp(min=0).sqrt(), sums


def _check(layer: nn.Module, x: Tensor, *, calls: int = 1, seed: int = 0) -> None:
    """The norms, and the clipped sum at a bound that clips the largest sample (0.7 of its norm)."""
    net = _Net(layer, calls, seed)
    params = [p for p in layer.parameters() if p.requires_grad]
    norms, _ = _truth(net, x, params, 1.0)
    max_norm = max(0.7 * float(norms.max()), 1e-3)
    _, want = _truth(net, x, params, max_norm)
    got_norms, got = _bookkeeping(net, x, params, max_norm)
    torch.testing.assert_close(got_norms.expand_as(norms), norms, rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _draw(seed: int, *shape: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 6),
    positions=st.sampled_from([(), (1,), (3,), (2, 5)]),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    bias=st.booleans(),
    calls=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_linear_over_any_positions_and_calls(
    batch: int, positions: tuple[int, ...], d_in: int, d_out: int, bias: bool, calls: int, seed: int
) -> None:
    """Both routes (Gram matrices when ``T`` is short, materialised otherwise) and shared weights."""
    torch.manual_seed(seed)
    _check(nn.Linear(d_in, d_out, bias=bias), _draw(seed, batch, *positions, d_in), calls=calls, seed=seed)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 5),
    c_in=st.integers(1, 12),
    c_out=st.integers(1, 12),
    kernel=st.integers(1, 4),
    dilation=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 3),
    length=st.integers(12, 24),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv1d_any_kernel_dilation_stride_padding(
    batch: int, c_in: int, c_out: int, kernel: int, dilation: int, stride: int, padding: int,
    length: int, bias: bool, seed: int,
) -> None:  # fmt: skip
    torch.manual_seed(seed)
    conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    _check(conv, _draw(seed, batch, c_in, length), seed=seed)


@pytest.mark.parametrize("route", ["gram", "materialised"])
def test_conv1d_takes_both_routes(route: str) -> None:
    """FedMER's default block (32 -> 32, dilation 2) takes the Gram route; a thin input the other."""
    torch.manual_seed(0)
    c_in = 32 if route == "gram" else 2
    _check(nn.Conv1d(c_in, 32, 3, padding=2, dilation=2), _draw(1, 4, c_in, 20), seed=1)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 5),
    groups=st.sampled_from([1, 2, 4]),
    per_group=st.integers(1, 3),
    length=st.integers(2, 7),  # one value per group normalises to 0: torch refuses it
    calls=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_group_norm(batch: int, groups: int, per_group: int, length: int, calls: int, seed: int) -> None:
    torch.manual_seed(seed)
    layer = nn.GroupNorm(groups, groups * per_group)
    with torch.no_grad():  # non-trivial affine parameters
        layer.weight.normal_()
        layer.bias.normal_()
    _check(layer, _draw(seed, batch, groups * per_group, length), calls=calls, seed=seed)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 5),
    positions=st.sampled_from([(), (3,), (2, 4)]),
    width=st.integers(2, 9),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_layer_norm(batch: int, positions: tuple[int, ...], width: int, bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    layer = nn.LayerNorm(width, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
    _check(layer, _draw(seed, batch, *positions, width), seed=seed)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 5),
    tokens=st.integers(1, 8),
    rows=st.integers(1, 6),
    dim=st.integers(1, 5),
    padding=st.booleans(),
    calls=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_embedding_with_repeated_ids_and_padding(
    batch: int, tokens: int, rows: int, dim: int, padding: bool, calls: int, seed: int
) -> None:
    """Repeated ids share a row's gradient; ``padding_idx`` gets none (torch's own backward)."""
    torch.manual_seed(seed)
    layer = nn.Embedding(rows, dim, padding_idx=0 if padding else None)
    ids = torch.randint(0, rows, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    _check(layer, ids, calls=calls, seed=seed)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv1d(3, 4, 3, padding="same"), (5, 3, 9)),  # a string padding: Opacus' sampler
        (nn.Conv1d(4, 6, 3, groups=2), (5, 4, 9)),  # grouped
        (nn.Conv2d(2, 3, 2), (5, 2, 4, 4)),  # no native rule at all
        (nn.InstanceNorm1d(3, affine=True), (5, 3, 6)),
    ],
    ids=["conv-same", "conv-groups", "conv2d", "instancenorm"],
)
def test_any_other_layer_opacus_samples_falls_back_to_its_sampler(
    layer: nn.Module, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    _check(layer, _draw(2, *shape), seed=3)


@pytest.mark.parametrize("part", ["weight", "bias"])
def test_only_the_optimizers_parameters_are_clipped_together(part: str) -> None:
    """A frozen or untrained parameter counts in no norm (Opacus: the norm is over the optimizer's)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    net = _Net(layer, 1, 0)
    x = _draw(0, 6, 4)
    trained = [getattr(layer, part)]
    norms, want = _truth(net, x, trained, 0.3)
    got_norms, got = _bookkeeping(net, x, trained, 0.3)
    torch.testing.assert_close(got_norms, norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-6)
    assert (norms > 0.3).any()


class _BareParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x * self.scale)


def _make_private(model: nn.Module, mode: str = "bk") -> object:
    from fedmer.config import DataConfig
    from fedmer.data.synthetic import generate_synthetic

    tiny = generate_synthetic(DataConfig(persons_per_site=1, sequences_per_person=4), 2, 0).train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), make_loader(tiny, 2, 0),
            noise_multiplier=1.0, max_grad_norm=1.0, history=PrivacyHistory(), grad_sample_mode=mode,
        )  # fmt: skip


def test_a_parameter_no_rule_covers_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match=r"no per-sample rule for scale \(_BareParameter\).*'hooks', 'ew'"):
        _make_private(_BareParameter())


def test_one_backward_per_step_and_no_step_without_one() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    setup = _make_private(lin)
    module, optimizer = setup.module, setup.optimizer  # type: ignore[attr-defined]
    x = _draw(0, 4, 3)
    with pytest.raises(RuntimeError, match="without a book-keeping backward"):
        optimizer.step()
    backpropagate(module, module(x).sum())
    with pytest.raises(RuntimeError, match="one backward per optimizer step"):
        backpropagate(module, module(x).sum())
    optimizer.step()  # consumes the first
    assert optimizer.accumulated_iterations == 1


def test_no_record_without_grad_and_none_after_remove_hooks() -> None:
    """Evaluation (no grad) records nothing; after training the layers carry no hooks."""
    lin = nn.Linear(3, 2)
    wrapped = BookkeepingModule(lin)
    with torch.no_grad():
        wrapped(_draw(0, 4, 3))
    assert wrapped._outputs == []
    wrapped.remove_hooks()
    wrapped(_draw(0, 4, 3))
    assert wrapped._outputs == [] and not lin._forward_hooks


class _Flattening(nn.Module):
    """A linear layer over ``(batch x positions, features)``: its rows are not samples."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.reshape(-1, 3)).reshape(len(x), -1).sum(1)


def test_a_layer_that_does_not_see_the_batch_first_is_an_error() -> None:
    wrapped = BookkeepingModule(_Flattening())
    with pytest.raises(ValueError, match=r"Linear output has leading dimension \(8,\), the batch is 2"):
        wrapped.backward(wrapped(_draw(0, 2, 4, 3)).sum())


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.lin(x)
        out.mul_(2.0)  # the recorded output is no longer the layer's output
        return out.sum(1)


def test_an_output_modified_in_place_is_an_error_not_a_wrong_norm() -> None:
    wrapped = BookkeepingModule(_InPlace())
    with pytest.raises(ValueError, match="output of Linear was modified in place"):
        wrapped.backward(wrapped(_draw(0, 2, 3)).sum())


def test_a_hooked_layer_that_returns_no_tensor_is_an_error() -> None:
    """Its parameters would otherwise get a zero per-sample gradient and silently never train."""

    class _Pair(nn.Linear):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
            return super().forward(x), x

    class _Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Embedding(4, 3)
            self.pair = _Pair(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.pair(self.layer(x))[0].sum((1, 2))

    from opacus.grad_sample import GradSampleModule

    GradSampleModule.GRAD_SAMPLERS[_Pair] = GradSampleModule.GRAD_SAMPLERS[nn.Linear]
    try:
        wrapped = BookkeepingModule(_Net())
        with pytest.raises(TypeError, match="_Pair returned tuple, not a tensor"):
            wrapped(torch.randint(0, 4, (2, 5)))
    finally:
        del GradSampleModule.GRAD_SAMPLERS[_Pair]
