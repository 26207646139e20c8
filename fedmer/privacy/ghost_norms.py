"""Per-sample gradient norms and clipped sums of one layer, from its inputs and output gradients.

Book-keeping DP-SGD (:mod:`fedmer.privacy.bk_dpsgd`) never stores a per-sample gradient
when it does not have to. For a linear map ``y_t = W a_t`` over ``T`` positions (a sequence,
a convolution's output positions) sample ``n``'s weight gradient is ``G_n = g_n^T a_n``, and

* its squared norm is ``<a_n a_n^T, g_n g_n^T>``, two ``T x T`` Gram matrices (the "ghost
  norm" of Li et al. 2022 and Bu et al. 2023), cheaper than ``G_n`` when ``T`` is short next to
  the layer's width;
* the clipped sum ``sum_n c_n G_n`` is one ordinary weight gradient of the rescaled output
  gradient ``c_n g_n``: the same matrix product (or convolution backward) a non-private step runs.

Each rule picks, per layer, whichever of the Gram route and the materialised ``G_n`` costs
fewer multiply-adds. Normalisation layers and embeddings use their exact per-sample formulas;
any other layer Opacus has a grad sampler for (``GradSampleModule.GRAD_SAMPLERS``) falls back to
that sampler's materialised per-sample gradients. Every rule returns the same two things, so
the clipping in :mod:`fedmer.privacy.bk_dpsgd` is one loop; ``tests/unit/test_bk_dpsgd.py``
pins each rule against per-sample gradients computed one sample at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight

__all__ = ["Call", "LayerClip", "Wanted", "layer_clip", "supports", "trained_of"]


@dataclass(frozen=True)
class Call:
    """One forward call of a layer: its (detached) inputs and the summed loss' gradient wrt its output."""

    inputs: tuple[Tensor, ...]
    grad_output: Tensor


@dataclass(frozen=True)
class LayerClip:
    """A layer's share of a step: per-sample squared gradient norms ``(N,)`` over ``params``, and
    ``clipped(c)``: the gradients ``sum_n c_n grad_n`` of those parameters, in their order."""

    params: tuple[nn.Parameter, ...]
    sq_norms: Tensor
    clipped: Callable[[Tensor], list[Tensor]]


#: The parameters of a layer to clip, by their name in the layer ("weight", "bias").
Wanted = list[tuple[str, nn.Parameter]]
Rule = Callable[[nn.Module, Sequence[Call], Wanted], LayerClip]


def trained_of(module: nn.Module, trained: frozenset[int]) -> Wanted:
    """``module``'s own parameters whose ids are in ``trained`` (the optimizer's), by name."""
    return [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) in trained]


def _linear_product(a: Tensor, g: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """For ``G_n = g_n^T a_n`` (``a``: ``(N, T, d_in)``, ``g``: ``(N, T, d_out)``): squared norms
    and the clipped-sum function, by the Gram route or the materialised ``G_n``, whichever is cheaper."""
    n, t, d_in = a.shape
    d_out = g.shape[2]
    if t * (d_in + d_out) < d_in * d_out or t == 1:  # Gram matrices (1 x 1 when t == 1) beat G_n
        if t == 1:
            sq = a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
        else:
            sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        return sq, lambda c: (g * c[:, None, None]).reshape(-1, d_out).T @ a.reshape(-1, d_in)
    per_sample = torch.bmm(g.transpose(1, 2), a).reshape(n, -1)
    return per_sample.pow(2).sum(1), lambda c: (c @ per_sample).view(d_out, d_in)


def _assemble(
    wanted: list[tuple[str, nn.Parameter]], parts: dict[str, tuple[Tensor, Callable[[Tensor], Tensor]]]
) -> LayerClip:
    """A :class:`LayerClip` from per-parameter (squared norms, clipped-sum function) pairs."""
    params = tuple(p for _, p in wanted)
    fns = [parts[name][1] for name, _ in wanted]
    sq = parts[wanted[0][0]][0] if wanted else torch.zeros(())
    for name, _ in wanted[1:]:
        sq = sq + parts[name][0]
    return LayerClip(params, sq, lambda c: [f(c).view_as(p) for f, p in zip(fns, params, strict=True)])


def _bias_part(gb: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """A materialised per-sample gradient ``(N, k)``: its squared norms and ``c @ gb``."""
    return torch.linalg.vecdot(gb, gb), lambda c: c @ gb


def _along_t(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _linear(module: nn.Module, calls: Sequence[Call], wanted: Wanted) -> LayerClip:
    """``nn.Linear`` over any leading dims; several calls (an RNN cell's steps) are one longer ``T``."""
    assert isinstance(module, nn.Linear)
    n = calls[0].grad_output.shape[0]
    a = _along_t([c.inputs[0].reshape(n, -1, module.in_features) for c in calls])
    g = _along_t([c.grad_output.reshape(n, -1, module.out_features) for c in calls])
    names = {name for name, _ in wanted}
    parts: dict[str, tuple[Tensor, Callable[[Tensor], Tensor]]] = {}
    if "weight" in names:
        parts["weight"] = _linear_product(a, g)
    if "bias" in names:
        parts["bias"] = _bias_part(g.sum(1))
    return _assemble(wanted, parts)


def _conv1d(module: nn.Module, calls: Sequence[Call], wanted: Wanted) -> LayerClip:
    """``nn.Conv1d`` (one call, ``groups=1``, zero padding): the input's Gram matrix, zero-padded
    as the input is and summed along each kernel tap's diagonal, or the unfolded per-sample
    gradient if cheaper."""
    assert isinstance(module, nn.Conv1d)
    (x,), g = calls[0].inputs, calls[0].grad_output
    (k,), (d,), (s,) = module.kernel_size, module.dilation, module.stride
    pad = int(module.padding[0])  # type: ignore[index]
    n, c_in, _ = x.shape
    c_out, length = g.shape[1], g.shape[2]
    parts: dict[str, tuple[Tensor, Callable[[Tensor], Tensor]]] = {}
    names = {name for name, _ in wanted}
    if "weight" in names:
        span = (length - 1) * s + 1
        if length * length * c_out + x.shape[2] ** 2 * c_in < c_out * c_in * k * length:
            # Gram of the input, zero-padded as the input is; tap j of output t reads t*s + j*d.
            gram_x = torch.bmm(x.transpose(1, 2), x)
            gram_x = F.pad(gram_x, (pad, pad, pad, pad)) if pad else gram_x
            taps = [gram_x[:, j * d : j * d + span : s, j * d : j * d + span : s] for j in range(k)]
            gram_u = taps[0] + taps[1] if k > 1 else taps[0].contiguous()
            for tap in taps[2:]:
                gram_u += tap
            sq = torch.linalg.vecdot(gram_u.reshape(n, -1), torch.bmm(g.transpose(1, 2), g).reshape(n, -1))
            weight_shape = module.weight.shape

            def clip(c: Tensor) -> Tensor:  # the convolution's own weight gradient of c_n * g_n
                return conv1d_weight(x, weight_shape, g * c[:, None, None], stride=s, padding=pad, dilation=d)

            parts["weight"] = (sq, clip)
        else:
            xp = F.pad(x, (pad, pad)) if pad else x
            unfolded = xp.unfold(2, (k - 1) * d + 1, s)[..., ::d]  # (N, C_in, L, K), a view
            u = unfolded.permute(0, 2, 1, 3).reshape(n, length, c_in * k)
            per_sample = torch.bmm(g, u).reshape(n, -1)
            parts["weight"] = (per_sample.pow(2).sum(1), lambda c: c @ per_sample)
    if "bias" in names:
        parts["bias"] = _bias_part(g.sum(2))
    return _assemble(wanted, parts)


def _normalisation(module: nn.Module, calls: Sequence[Call], wanted: Wanted) -> LayerClip:
    """GroupNorm / LayerNorm affine parameters: ``sum g * x_hat`` and ``sum g`` per sample (exact, small)."""
    n = calls[0].grad_output.shape[0]
    gw: Tensor | int = 0
    gb: Tensor | int = 0
    for call in calls:
        x, g = call.inputs[0], call.grad_output
        if isinstance(module, nn.GroupNorm):
            x_hat = F.group_norm(x, module.num_groups, eps=module.eps).reshape(n, module.num_channels, -1)
            g = g.reshape(n, module.num_channels, -1)
            gw = gw + torch.linalg.vecdot(g, x_hat)
            gb = gb + g.sum(-1)
        else:
            assert isinstance(module, nn.LayerNorm)
            shape = module.normalized_shape
            x_hat = F.layer_norm(x, shape, eps=module.eps)
            gw = gw + (g * x_hat).reshape(n, -1, *shape).sum(1).reshape(n, -1)
            gb = gb + g.reshape(n, -1, *shape).sum(1).reshape(n, -1)
    assert isinstance(gw, Tensor) and isinstance(gb, Tensor)
    return _assemble(wanted, {"weight": _bias_part(gw), "bias": _bias_part(gb)})


def _embedding(module: nn.Module, calls: Sequence[Call], wanted: Wanted) -> LayerClip:
    """``nn.Embedding``: rows hit by the same id share a gradient, so ``|G_n|^2`` sums ``g_t . g_t'``
    over equal ids; the clipped sum scatters ``c_n g_n`` into the table. ``padding_idx`` gets no
    gradient, as in torch's own backward."""
    assert isinstance(module, nn.Embedding)
    n = calls[0].grad_output.shape[0]
    each = [c.inputs[0].reshape(n, -1) for c in calls]
    ids = _along_t(each)
    g = _along_t([c.grad_output.reshape(n, i.shape[1], -1) for c, i in zip(calls, each, strict=True)])
    if module.padding_idx is not None:
        g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
    sq = (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    rows, dim = module.num_embeddings, module.embedding_dim

    def clip(c: Tensor) -> Tensor:
        return g.new_zeros(rows, dim).index_add_(0, ids.reshape(-1), (g * c[:, None, None]).reshape(-1, dim))

    return _assemble(wanted, {"weight": (sq, clip)})


def _opacus_sampler(module: nn.Module, calls: Sequence[Call], wanted: Wanted) -> LayerClip:
    """Any other layer Opacus has a grad sampler for: its per-sample gradients, summed over calls."""
    sampler = GradSampleModule.GRAD_SAMPLERS[type(module)]
    totals: dict[int, Tensor] = {}
    for call in calls:
        for p, sample in sampler(module, list(call.inputs), call.grad_output).items():
            totals[id(p)] = totals[id(p)] + sample if id(p) in totals else sample
    parts: dict[str, tuple[Tensor, Callable[[Tensor], Tensor]]] = {}
    for name, p in wanted:
        flat = totals[id(p)].reshape(len(totals[id(p)]), -1)
        parts[name] = _bias_part(flat)  # a materialised (N, k) gradient: the same two formulas
    return _assemble(wanted, parts)


def _native_rule(module: nn.Module, calls: int) -> Rule | None:
    """FedMER's own rule for ``module``, when one applies exactly."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return _linear
    if (
        type(module) is nn.Conv1d
        and calls == 1
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return _conv1d
    if type(module) in (nn.GroupNorm, nn.LayerNorm):
        return _normalisation
    if (
        type(module) is nn.Embedding
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    ):
        return _embedding
    return None


def supports(module: nn.Module) -> bool:
    """Whether some rule computes ``module``'s per-sample norms (FedMER's own, or an Opacus grad sampler)."""
    return _native_rule(module, 1) is not None or type(module) in GradSampleModule.GRAD_SAMPLERS


def layer_clip(module: nn.Module, calls: Sequence[Call], wanted: Wanted) -> LayerClip:
    """``module``'s squared per-sample norms and clipped sums over ``wanted`` (:func:`trained_of`)."""
    rule = _native_rule(module, len(calls)) or _opacus_sampler
    return rule(module, calls, wanted)
