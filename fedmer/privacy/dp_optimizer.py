"""Opacus' DP-SGD optimizer for a loss summed over the batch, averaged in one place.

Opacus' ``loss_reduction="mean"`` has every per-sample-gradient mode (hooks, expanded weights,
functorch) multiply each per-sample gradient by the batch size, to undo the mean's ``1/B``,
and its optimizer then divides the clipped, noised sum by the expected batch size. For
FedMER's default model that is a pass over 128 x 18,697 values a step for nothing, on top of
Opacus' per-parameter ``einsum`` and a ``scale_grad`` that recounts the accumulated steps once
per parameter (quadratic in the parameter count). DP-SGD here backpropagates the *sum* of the
per-sample losses instead (the wrapper is built with ``loss_reduction="sum"``, which
:func:`fedmer.training.loops.reduce_losses` reads), so per-sample gradients come out as they
are, and :class:`SummedLossDPOptimizer` divides by the expected batch size once.

The step is Opacus' in every other respect: the same per-sample norms, clip factor
``min(1, C / (norm + 1e-6))``, noise (Opacus' own ``add_noise``, with ``secure_mode`` and
the generator it was given), skip queue and accountant hook. What changes is arithmetic order
only (a matrix-vector product instead of ``einsum``); ``tests/unit/test_dp_optimizer.py``
pins the update against Opacus' ``mean`` path for every ``grad_sample_mode``, and
``bench.dp_step`` measures the saving.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

__all__ = ["LOSS_REDUCTION", "SummedLossDPOptimizer"]

#: How the per-sample losses are reduced before ``backward`` under DP-SGD (the wrapper's setting).
LOSS_REDUCTION = "sum"


class SummedLossDPOptimizer(DPOptimizer):
    """A :class:`~opacus.optimizers.DPOptimizer` whose step is the mean-reduction step, fed a summed loss.

    The per-sample gradients it reads are those of each sample's own loss (a wrapper built
    with ``loss_reduction="sum"``); it clips them, sums, adds Opacus' noise and divides by
    ``expected_batch_size``: exactly what Opacus' ``mean`` reduction hands the inner optimizer.
    """

    @classmethod
    def replacing(cls, engine_optimizer: DPOptimizer) -> SummedLossDPOptimizer:
        """The same optimizer as the one ``PrivacyEngine.make_private`` built, accountant hook included."""
        if type(engine_optimizer) is not DPOptimizer:
            raise TypeError(
                f"expected Opacus' flat-clipping DPOptimizer, got {type(engine_optimizer).__name__}"
            )
        if engine_optimizer.expected_batch_size is None:
            raise ValueError("the DP optimizer has no expected batch size to average by")
        optimizer = cls(
            engine_optimizer.original_optimizer,
            noise_multiplier=engine_optimizer.noise_multiplier,
            max_grad_norm=engine_optimizer.max_grad_norm,
            expected_batch_size=engine_optimizer.expected_batch_size,
            loss_reduction="mean",  # what the step computes; the wrapper's reduction is LOSS_REDUCTION
            generator=engine_optimizer.generator,
            secure_mode=engine_optimizer.secure_mode,
        )
        if engine_optimizer.step_hook is not None:
            optimizer.attach_step_hook(engine_optimizer.step_hook)
        return optimizer

    def clip_and_accumulate(self) -> None:
        """Opacus' flat clipping, with one matrix-vector product per parameter for the weighted sum."""
        if any(not isinstance(p.grad_sample, torch.Tensor) for p in self.params):
            super().clip_and_accumulate()  # accumulated micro-batches (a list per parameter): Opacus' path
            return
        samples = self.grad_samples
        n = len(samples[0])
        if n == 0:
            super().clip_and_accumulate()  # an empty Poisson batch: zero clipped sum, Opacus' path
            return
        flat = [g.reshape(n, -1) for g in samples]
        norms = torch.stack([torch.linalg.vector_norm(f, dim=1) for f in flat], dim=1)
        factor = (self.max_grad_norm / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)).clamp(max=1.0)
        for p, f in zip(self.params, flat, strict=True):
            _check_processed_flag(p.grad_sample)
            grad = (factor.to(p.dtype) @ f.to(p.dtype)).view(p.shape)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    def scale_grad(self) -> None:
        """Divide the noised sum by the expected batch size (times accumulated steps, counted once)."""
        divisor = self.expected_batch_size * self.accumulated_iterations
        for p in self.params:
            p.grad /= divisor
