"""Per-modality temporal encoders: a ``(B, T, F_m)`` sequence in, one ``(B, H)`` embedding out.

Every layer here is one Opacus computes per-sample gradients for without ``ModuleValidator.fix``:
GroupNorm instead of BatchNorm (batch statistics mix samples, which breaks the per-sample
sensitivity bound DP-SGD relies on), ``opacus.layers.DPGRU`` instead of ``nn.GRU`` (whose fused
cuDNN/ATen kernel hides the per-step activations the hooks need), and no raw ``nn.Parameter``
used directly in ``forward``. There is no dropout: DP noise already regularises, and
deterministic forward passes keep tests and explanations reproducible.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from opacus.layers import DPGRU
from torch import Tensor, nn

from fedmer import registry
from fedmer.config import ConfigError

__all__ = [
    "ENCODERS",
    "MODALITY_ENCODERS",
    "AttentivePool",
    "CRNNEncoder",
    "FunctionalsEncoder",
    "GRUEncoder",
    "LinearMeansEncoder",
    "TCNEncoder",
    "build_encoder",
    "contiguous_grad",
    "register_modality_encoder",
]

logger = logging.getLogger(__name__)


def _groups(channels: int, preferred: int = 4) -> int:
    """Largest group count <= ``preferred`` dividing ``channels`` (GroupNorm needs a divisor)."""
    for g in range(min(preferred, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class AttentivePool(nn.Module):
    """Softmax-weighted average over time, so salient frames dominate the embedding.

    Scored by a ``Linear`` on each frame (Opacus handles the extra time dimension), which
    also makes the per-frame weights available for temporal explanations.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden, 1)

    def forward(self, h: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``h``: ``(B, T, H)`` -> ``(B, H)`` (and the ``(B, T)`` weights if asked)."""
        w = torch.softmax(self.score(h).squeeze(-1), dim=1)
        pooled = torch.einsum("bt,bth->bh", w, h)
        return (pooled, w) if return_weights else pooled


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    Below 32 samples a batch, torch's expanded-weights ``Conv1d`` computes its per-sample
    gradients with ``grad_output.view(...)``, which fails on a strided gradient (one that comes
    back through a transpose, or from the expanded-weights GroupNorm): "view size is not
    compatible". Placed right after the convolution, it makes that gradient contiguous (a copy
    only where it is not). Opacus' default batch of 128 never took that path; the auto recipe's
    smaller batches do.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


def contiguous_grad(x: Tensor) -> Tensor:
    """``x``, whose gradient reaches the layer before it contiguous (see :class:`_ContiguousGrad`)."""
    if not x.requires_grad or torch.jit.is_tracing() or torch.jit.is_scripting():
        return x  # no backward to fix; TorchScript/ONNX export cannot trace a Python autograd Function
    out: Tensor = _ContiguousGrad.apply(x)
    return out


class _ConvBlock(nn.Module):
    """Conv1d -> GroupNorm -> GELU; 'same' padding, so only ``stride`` changes the time length."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int = 1, stride: int = 1) -> None:
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.conv = nn.Conv1d(in_ch, out_ch, kernel, stride=stride, padding=pad, dilation=dilation)
        self.norm = nn.GroupNorm(_groups(out_ch), out_ch)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C_in, T)`` -> ``(B, C_out, T)``.

        A one-channel input (a one-feature modality, e.g. Stress-Predict's) makes the convolution
        return a channels-last tensor, which Opacus' expanded-weights GroupNorm refuses; made
        contiguous here (a no-op for every other input).
        """
        y = contiguous_grad(self.conv(x).contiguous())
        return self.act(self.norm(y))


class TCNEncoder(nn.Module):
    """Two dilated conv blocks with a residual link, then attentive pooling over time.

    Kernel 3 with dilations 1 and 2 sees 7 frames per output step, enough for the short
    (~20 frame) windows FedMER uses, and stays a few thousand parameters per modality so
    DP-SGD noise (which scales with dimension) does not swamp the signal.
    """

    def __init__(self, in_dim: int, hidden: int, kernel: int = 3) -> None:
        super().__init__()
        self.block1 = _ConvBlock(in_dim, hidden, kernel, dilation=1)
        self.block2 = _ConvBlock(hidden, hidden, kernel, dilation=2)
        self.pool = AttentivePool(hidden)

    def sequence(self, x: Tensor) -> Tensor:
        """Per-frame features ``(B, T, H)`` before pooling."""
        h1 = self.block1(x.transpose(1, 2))
        h2 = self.block2(h1) + h1
        return h2.transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, T, F_m)`` -> ``(B, H)``."""
        return self.pool(self.sequence(x))


def _drop_aliases(aliases: dict[str, str], _m: nn.Module, state: dict, prefix: str, *_: object) -> None:
    """state_dict post-hook: remove the DPGRU cell-level duplicate keys."""
    for old in aliases:
        state.pop(prefix + old, None)


def _restore_aliases(aliases: dict[str, str], _m: nn.Module, state: dict, prefix: str, *_: object) -> None:
    """load_state_dict pre-hook: re-add the duplicates so strict loading finds them."""
    for old, new in aliases.items():
        if prefix + new in state and prefix + old not in state:
            state[prefix + old] = state[prefix + new]


def _dedupe_gru_state(owner: nn.Module, attr: str) -> None:
    """Make ``owner``'s state_dict list its DPGRU ``owner.<attr>`` once, under nn.GRU's names.

    DPGRU registers its weights twice (``weight_ih_l0`` and its cell's ``l0.ih.weight``) and
    its own filter only works when it is the top-level module. Nested, both keys reach the
    state_dict: Flower would ship the GRU twice, and update-norm clipping, robust-aggregation
    distances and checkpoints would count it twice. The hooks go on the owner (the DPGRU's
    own hook swaps in a copy of the dict, so its later hooks would edit the wrong one); the
    load hook re-adds the aliases so a strict ``load_state_dict`` accepts the short dict.
    ``partial`` of module-level functions, not closures, keeps models picklable.
    """
    renames = getattr(owner, attr).old_to_new.items()
    aliases = {f"{attr}.{old}": f"{attr}.{new}" for old, new in renames}
    owner.register_state_dict_post_hook(functools.partial(_drop_aliases, aliases))
    owner.register_load_state_dict_pre_hook(functools.partial(_restore_aliases, aliases))


class GRUEncoder(nn.Module):
    """Strided Conv1d front (local smoothing, feature lift to H) followed by a DP-compatible GRU.

    The last hidden state summarises the sequence; the recurrence lets the embedding
    depend on order over the whole window rather than a fixed receptive field. DPGRU runs
    its cell in Python once per step, with Opacus hooks on every call, so the front halves
    the time axis (``stride=2``): half the recurrent steps, about half the DP-SGD step time.
    """

    def __init__(self, in_dim: int, hidden: int, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.front = _ConvBlock(in_dim, hidden, kernel, stride=stride)
        self.gru = DPGRU(hidden, hidden, num_layers=1, batch_first=True)
        _dedupe_gru_state(self, "gru")

    def sequence(self, x: Tensor) -> Tensor:
        """GRU outputs at every (strided) step, ``(B, ceil(T / stride), H)``."""
        out, _ = self.gru(self.front(x.transpose(1, 2)).transpose(1, 2))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, T, F_m)`` -> ``(B, H)`` (last hidden state)."""
        _, h_n = self.gru(self.front(x.transpose(1, 2)).transpose(1, 2))
        return h_n[-1]


class CRNNEncoder(nn.Module):
    """Temporal CNN then a recurrent layer, in the spirit of Tzirakis et al. (2017).

    Their end-to-end audio-visual network learns features from raw input with a conv stack
    (each conv followed by max pooling over time) and models their dynamics with a 2-layer
    LSTM. Here: two conv stages (a wide kernel lifting to ``H/2`` channels, then ``H``
    channels; GroupNorm, not BatchNorm, see the module docstring), each followed by max
    pooling that halves the time axis, then one ``DPGRU`` layer whose last hidden state is
    the embedding. One GRU layer instead of two LSTM layers keeps the parameter count (the
    dimension DP-SGD noise is spread over) near the other encoders', and the quartered time
    axis makes the Python-loop DPGRU cheap.
    """

    def __init__(self, in_dim: int, hidden: int, kernel: int = 5, pool: int = 2) -> None:
        super().__init__()
        mid = max(1, hidden // 2)
        self.conv1 = _ConvBlock(in_dim, mid, kernel)
        self.conv2 = _ConvBlock(mid, hidden, 3)
        self.pool = nn.MaxPool1d(pool, ceil_mode=True)
        self.gru = DPGRU(hidden, hidden, num_layers=1, batch_first=True)
        _dedupe_gru_state(self, "gru")

    def _features(self, x: Tensor) -> Tensor:
        h = self.pool(self.conv1(x.transpose(1, 2)))
        return self.pool(self.conv2(h)).transpose(1, 2)

    def sequence(self, x: Tensor) -> Tensor:
        """GRU outputs at every pooled step, ``(B, ceil(ceil(T / 2) / 2), H)``."""
        out, _ = self.gru(self._features(x))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, T, F_m)`` -> ``(B, H)`` (last hidden state)."""
        _, h_n = self.gru(self._features(x))
        return h_n[-1]


class FunctionalsEncoder(nn.Module):
    """Per-sequence functionals (mean and std of each feature over time), then a linear map.

    The utterance-level "functionals" of speech emotion recognition (openSMILE, eGeMAPS):
    order-free statistics of the frames, the inputs of the classic per-clip logistic-regression
    and SVM baselines. Few parameters (``2 F_m x H``), so DP-SGD's noise per weight stays small.
    With data.standardize=federated the functionals are standardised by
    ``(f - shift) * scale`` (persistent buffers, added by :meth:`enable_functional_stats`,
    set from the clients' released sums by :meth:`set_functional_stats`). The std carries
    ``+1e-6`` under its root: a feature constant over a clip (RAVDESS' face numbers) would
    otherwise have an infinite gradient at std 0.
    """

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.shift: Tensor | None = None
        self.scale: Tensor | None = None
        self.proj = nn.Linear(2 * in_dim, hidden)
        self.act: nn.Module = nn.ReLU()

    def enable_functional_stats(self) -> None:
        """Add the standardisation buffers (identity). Only models built with
        ``standardize=True`` have them: Flower's client-level DP wrappers noise every array,
        which is why that mode refuses standardisation (``fedmer.config``)."""
        del self.shift, self.scale  # plain None attributes until now
        self.register_buffer("shift", torch.zeros(2 * self.in_dim))
        self.register_buffer("scale", torch.ones(2 * self.in_dim))

    def set_functional_stats(self, shift: Tensor, scale: Tensor) -> None:
        """Standardise ``[mean, std]`` functionals with these ``(2 F_m,)`` vectors from now on."""
        if self.shift is None or self.scale is None:
            raise ValueError("functional statistics need enable_functional_stats() first (standardize=True)")
        if shift.shape != self.shift.shape or scale.shape != self.scale.shape:
            raise ValueError(
                f"functional statistics of shape {tuple(shift.shape)}, expected {tuple(self.shift.shape)}"
            )
        with torch.no_grad():
            self.shift.copy_(shift)
            self.scale.copy_(scale)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, T, F_m)`` -> ``(B, H)``."""
        mean = x.mean(dim=1)
        std = torch.sqrt(x.var(dim=1, unbiased=False) + 1e-6)
        features = torch.cat([mean, std], dim=-1)
        if self.shift is not None and self.scale is not None:
            features = (features - self.shift) * self.scale
        return self.act(self.proj(features))


EncoderFactory = Callable[[int, int], nn.Module]

#: name -> factory ``(in_dim, hidden) -> module mapping (B, T, in_dim) to (B, hidden)``.
ENCODERS = registry.ENCODERS


class LinearFunctionalsEncoder(FunctionalsEncoder):
    """The per-clip functionals mapped linearly, no activation: with the ``sum`` fusion the whole
    network is a multinomial logistic regression on the functionals of every present modality.

    The fewest parameters a classifier of these features can have; DP-SGD's noise grows with
    the parameter count and its steps are few, so this is the model that keeps most of its
    accuracy at small epsilon on small clients (Tramer & Boneh 2021).
    """

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__(in_dim, hidden)
        self.act = nn.Identity()  # W [mean, std] + b: the logits of this modality


class LinearMeansEncoder(nn.Module):
    """The per-clip mean of every frame feature mapped linearly: half the inputs of
    :class:`LinearFunctionalsEncoder` (no std over frames).

    DP-SGD's noise norm grows with the square root of the parameter count while the signal does
    not, so on small clients the fewer inputs win: validated across RAVDESS' *training* sites
    (README, "DP that learns"). With the ``sum`` fusion the network is a multinomial logistic
    regression on the per-clip means of every present modality.
    """

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.proj = nn.Linear(in_dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, T, F_m)`` -> ``(B, H)``."""
        return self.proj(x.mean(dim=1))


for _name, _factory in (
    ("tcn", TCNEncoder),
    ("gru", GRUEncoder),
    ("crnn", CRNNEncoder),
    ("functionals", FunctionalsEncoder),
    ("functionals_linear", LinearFunctionalsEncoder),
    ("means_linear", LinearMeansEncoder),
):
    ENCODERS.register(_name, _factory)


#: modality -> factory that replaces ``model.encoder`` for that modality, for inputs whose
#: columns are not frame features (e.g. MELD's token ids need an embedding, not a conv).
MODALITY_ENCODERS: dict[str, EncoderFactory] = {}


def register_modality_encoder(modality: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator: always encode ``modality`` with this factory, whatever ``model.encoder`` says."""

    def wrap(factory: EncoderFactory) -> EncoderFactory:
        MODALITY_ENCODERS[modality] = factory
        return factory

    return wrap


def build_encoder(name: str, in_dim: int, hidden: int, modality: str | None = None) -> nn.Module:
    """Instantiate a registered encoder; unknown names fail listing the valid ones.

    A factory registered for ``modality`` (see :func:`register_modality_encoder`) wins.
    """
    if modality is not None and modality in MODALITY_ENCODERS:
        logger.debug("encoder for modality %s: in_dim=%d hidden=%d", modality, in_dim, hidden)
        return MODALITY_ENCODERS[modality](in_dim, hidden)
    factory = ENCODERS.get(name)
    if in_dim <= 0:
        raise ConfigError(f"invalid encoder input width {in_dim}: every modality needs >= 1 feature column")
    logger.debug("encoder %s: in_dim=%d hidden=%d", name, in_dim, hidden)
    return factory(in_dim, hidden)
