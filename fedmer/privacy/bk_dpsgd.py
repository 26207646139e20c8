"""Book-keeping DP-SGD: Opacus' clipped, noised step, without materialising per-sample gradients.

Every Opacus ``grad_sample_mode`` that trains FedMER's models (hooks, expanded weights,
functorch) computes the ordinary backward pass *and* a ``(B, ...)`` per-sample gradient of
every parameter, then reads those back twice (norms, weighted sum). Book-keeping (Bu et al.,
"Differentially private optimization on large model at small cost", ICML 2023) keeps what a
layer's gradient is made of instead: its inputs (recorded in a forward hook) and the gradient
of the summed loss wrt its output (one ``torch.autograd.grad`` over the recorded outputs, which
also skips every weight gradient autograd would otherwise compute). From those,
:mod:`fedmer.privacy.ghost_norms` gives each sample's gradient norm and, once the clip factors
are known, each parameter's clipped sum as one ordinary weight gradient.

The update is Opacus' flat clipping to the letter (the same factor ``min(1, C / (norm + 1e-6))``
on the norm over all of the optimizer's parameters, the same noise, skip queue and accountant
hook: :class:`BookkeepingDPOptimizer` only replaces how ``clip_and_accumulate`` gets the
clipped sum). ``tests/unit/test_bk_dpsgd.py`` compares every layer rule with per-sample
gradients computed one sample at a time, and ``tests/unit/test_grad_sample_mode.py`` a whole
epoch of every model family with hooks'. The assumption is Opacus' own: a sample's loss
depends on no other sample (no BatchNorm; Opacus' validator refuses one).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from opacus.grad_sample.gsm_no_op import GradSampleModuleNoOp
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fedmer.privacy.dp_optimizer import LOSS_REDUCTION, SummedLossDPOptimizer
from fedmer.privacy.ghost_norms import Call, Wanted, layer_clip, supports, trained_of

__all__ = ["BOOKKEEPING_MODE", "BookkeepingDPOptimizer", "BookkeepingModule"]

#: ``privacy.grad_sample_mode`` value that selects book-keeping (the others are Opacus' own).
BOOKKEEPING_MODE = "bk"


class BookkeepingModule(GradSampleModuleNoOp):
    """Opacus' pass-through wrapper plus forward hooks that record each layer call for DP-SGD.

    Train it with :meth:`backward` in place of ``loss.backward()`` (FedMER's loop does:
    :func:`fedmer.training.loops.backpropagate`); the optimizer reads the result.
    """

    def __init__(self, module: nn.Module, *, loss_reduction: str = LOSS_REDUCTION) -> None:
        super().__init__(module, batch_first=True, loss_reduction=loss_reduction)
        self.layers = [
            m
            for m in module.modules()
            if supports(m) and any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        self._handles: list[RemovableHandle] = [m.register_forward_hook(self._record) for m in self.layers]
        self._outputs: list[tuple[nn.Module, tuple[Tensor, ...], Tensor, int]] = []
        self._calls: dict[nn.Module, list[Call]] | None = None
        self._wanted: tuple[frozenset[int], dict[nn.Module, Wanted]] | None = None  # per optimizer
        self._batch = 0

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        self._batch = len(x)  # every recorded layer must see the batch first (checked in backward)
        return super().forward(x, *args, **kwargs)  # type: ignore[no-any-return]

    def _record(self, module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if not torch.is_grad_enabled():
            return  # evaluation: nothing to clip
        if not isinstance(output, Tensor):
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}, not a tensor")
        if output.requires_grad:
            detached = tuple(x.detach() if isinstance(x, Tensor) else x for x in inputs)
            self._outputs.append((module, detached, output, output._version))  # type: ignore[arg-type]

    def backward(self, loss: Tensor) -> None:
        """The gradient of ``loss`` wrt every recorded layer output (and nothing else)."""
        if self._calls is not None:
            raise RuntimeError("book-keeping DP-SGD takes one backward per optimizer step (no accumulation)")
        outputs, self._outputs = self._outputs, []
        calls: dict[nn.Module, list[Call]] = defaultdict(list)
        if outputs:
            for module, _, output, version in outputs:
                if output._version != version:  # the gradient would be wrt the modified tensor
                    raise ValueError(
                        f"the output of {type(module).__name__} was modified in place after the layer ran "
                        "(an in-place op such as +=, relu_ or inplace=True): book-keeping cannot attribute "
                        "its gradient; compute it out of place, or use grad_sample_mode 'hooks' or 'ew'"
                    )
                if output.shape[:1] != (self._batch,):
                    raise ValueError(
                        f"{type(module).__name__} output has leading dimension {tuple(output.shape[:1])}, "
                        f"the batch is {self._batch}: per-sample clipping needs the batch first in every "
                        "layer (a flattened (batch x positions, features) input mixes samples)"
                    )
            grads = torch.autograd.grad(loss, [o for _, _, o, _ in outputs], allow_unused=True)
            for (module, inputs, output, _), g in zip(outputs, grads, strict=True):
                calls[module].append(Call(inputs, torch.zeros_like(output) if g is None else g))
        self._calls = calls

    @torch.no_grad()
    def clipped_sums(self, params: list[nn.Parameter], max_grad_norm: float) -> list[Tensor]:
        """Each of ``params``' sum of per-sample gradients clipped to ``max_grad_norm`` as a whole."""
        calls, self._calls = self._calls, None
        if calls is None:
            raise RuntimeError(
                "optimizer step without a book-keeping backward (call BookkeepingModule.backward)"
            )
        trained = frozenset(id(p) for p in params)
        if self._wanted is None or self._wanted[0] != trained:
            self._wanted = (trained, {m: trained_of(m, trained) for m in self.layers})
        wanted = self._wanted[1]
        layers = [layer_clip(m, c, wanted[m]) for m, c in calls.items() if wanted[m]]
        sums: dict[int, Tensor] = {}
        if layers:  # else an empty Poisson batch: nothing to clip, a zero sum
            sq = layers[0].sq_norms
            for layer in layers[1:]:
                sq = sq + layer.sq_norms
            factor = (max_grad_norm / (sq.clamp(min=0).sqrt() + 1e-6)).clamp(max=1.0)
            for layer in layers:
                for p, grad in zip(layer.params, layer.clipped(factor), strict=True):
                    sums[id(p)] = sums[id(p)] + grad if id(p) in sums else grad
        return [sums[id(p)] if id(p) in sums else torch.zeros_like(p) for p in params]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs, self._calls = [], None
        super().remove_hooks()


class BookkeepingDPOptimizer(SummedLossDPOptimizer):
    """:class:`SummedLossDPOptimizer` whose clipped sum comes from a :class:`BookkeepingModule`."""

    module: BookkeepingModule

    @classmethod
    def for_module(cls, engine_optimizer: DPOptimizer, module: BookkeepingModule) -> BookkeepingDPOptimizer:
        """``engine_optimizer`` (built by ``make_private``) reading ``module``'s records; every
        parameter it trains must belong to a layer the module records, or this refuses."""
        optimizer = cls.replacing(engine_optimizer)
        assert isinstance(optimizer, cls)
        covered = {id(p) for m in module.layers for p in m.parameters(recurse=False)}
        trained = {id(p) for p in optimizer.params}
        missing = sorted(
            f"{name} ({type(owner).__name__})"
            for owner_name, owner in module._module.named_modules()
            for local, p in owner.named_parameters(recurse=False)
            if id(p) in trained and id(p) not in covered
            for name in [f"{owner_name}.{local}" if owner_name else local]
        )
        if missing:
            raise ValueError(
                f"grad_sample_mode={BOOKKEEPING_MODE!r} has no per-sample rule for {', '.join(missing)}: "
                "use grad_sample_mode 'hooks', 'ew' or 'functorch' for this model"
            )
        optimizer.module = module
        return optimizer

    @property
    def accumulated_iterations(self) -> int:
        """Always 1: :meth:`BookkeepingModule.backward` refuses a second backward before a step.
        (Opacus counts ``p.grad_sample`` entries; the accountant hook multiplies the sample rate by it.)"""
        return 1

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        """Opacus' ``pre_step``, less its first check (that ``p.grad_sample`` exists: none is made here)."""
        if not self.params:
            return True  # nothing to train: Opacus' corner case
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def clip_and_accumulate(self) -> None:
        for p, grad in zip(
            self.params, self.module.clipped_sums(self.params, self.max_grad_norm), strict=True
        ):
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
