"""The cost of one DP-SGD step over a non-private step, for each ``grad_sample_mode``.

The default run's model (``make run``: ``configs/`` composed with no overrides, built by
``build_model_for`` on client 0's synthetic data) takes one optimisation step on a batch of the
default size (``federation.batch_size``): forward, backward, optimizer step. Non-private, that is
plain SGD with momentum on the mean per-sample loss; under DP-SGD the optimizer step also clips
every per-sample gradient and adds the noise of the default run. Each mode is set up as
FedMER trains (``make_private`` over ``SampleLosses``, the loss computed through the wrapper,
backpropagated with ``backpropagate``): "bk" is FedMER's book-keeping (the default), the others
Opacus' own per-sample-gradient modes;
``ghost`` is not one FedMER accepts (it needs Opacus' own loss wrapper) and is timed through
Opacus directly, as it fails on the model and, separately, with the failing index made contiguous.

Modes are interleaved (each round runs a few consecutive steps of every mode in turn, so a busy
machine slows all alike), on one torch thread as the ClientApp runs
(``fedmer.federation.node.node_of``), the first round left out as warm-up; the table gives each
mode's median step, its forward / backward / optimizer-step split, and the ratio to the
non-private step (the median over rounds of the two modes' median steps in the same round).
A second table times a whole local round (``train_local``: Opacus' setup, Poisson loader, the
default 2 epochs) per mode accepted by ``privacy.grad_sample_mode``.

    .venv/bin/python -m bench.dp_step                 # ~2 minutes; bench/results/dp_step.json
    .venv/bin/python -m bench.dp_step --rounds 6 --local-rounds 3   # quicker, noisier
    .venv/bin/python -m bench.dp_step --families      # also every model family's local round (~6 min)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import opacus
import torch
from opacus import PrivacyEngine
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from fedmer.config import GRAD_SAMPLE_MODES, ExperimentConfig
from fedmer.data.base import MultimodalDataset
from fedmer.data.registry import load_client_dataset
from fedmer.models import build_model_for, count_parameters
from fedmer.privacy.engine import PrivacyHistory, make_private
from fedmer.privacy.recipe import MOMENTUM
from fedmer.privacy.run_noise import local_recipe
from fedmer.training.local import DPSGD, train_local
from fedmer.training.loops import SampleLosses, backpropagate, batch_losses, make_loader, reduce_losses
from simulations.compose import compose_experiment

RESULTS = Path(__file__).resolve().parent / "results" / "dp_step.json"
NON_PRIVATE = "non-private"
#: The modes, in the order of the table ("bk": FedMER's book-keeping, fedmer.privacy.bk_dpsgd;
#: the rest are Opacus'; "ghost*": ghost with the embedding index made contiguous;
#: "ew-mean": ew with Opacus' mean reduction and optimizer, FedMER's set-up before session 13;
#: "ew-group": ew with torch's grouped-convolution per-sample gradient for every ``Conv1d``).
MODES = ("bk", "hooks", "ew", "ew-mean", "ew-group", "functorch", "ghost", "ghost*")
THREADS = 1  # what node_of sets: one Ray CPU per simulated client


@dataclass
class Stepper:
    """One way to take a training step; ``step(batch)`` returns (forward, backward, optimizer) seconds."""

    name: str
    step: Callable[[Sequence[torch.Tensor]], tuple[float, float, float]]


def _timed_step(
    module: torch.nn.Module, opt: torch.optim.Optimizer
) -> Callable[[Sequence[torch.Tensor]], tuple[float, float, float]]:
    """One step of ``opt`` on ``module``'s per-sample losses, reduced as FedMER trains (mean, or the
    sum a DP wrapper asks for: ``reduce_losses``), timed (forward, backward, optimizer)."""

    def step(batch: Sequence[torch.Tensor]) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = reduce_losses(module, batch_losses(module, batch))
        t1 = time.perf_counter()
        backpropagate(module, loss)  # loss.backward(), or book-keeping's own
        t2 = time.perf_counter()
        opt.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return step


def _plain(cfg: ExperimentConfig, data: MultimodalDataset) -> Stepper:
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, data).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.federation.lr, momentum=MOMENTUM)

    return Stepper(NON_PRIVATE, _timed_step(model, opt))


def _private(cfg: ExperimentConfig, data: MultimodalDataset, mode: str, noise: float) -> Stepper:
    """``mode`` set up as FedMER's DP-SGD does (``make_private`` over ``SampleLosses``)."""
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, data).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.federation.lr, momentum=MOMENTUM)
    loader = make_loader(data, cfg.federation.batch_size, cfg.seed)
    setup = make_private(
        SampleLosses(model), opt, loader, noise_multiplier=noise, max_grad_norm=cfg.privacy.max_grad_norm,
        history=PrivacyHistory(), grad_sample_mode=mode,
    )  # fmt: skip
    wrapped, dp_opt = setup.module, setup.optimizer

    return Stepper(mode, _timed_step(wrapped, dp_opt))


def _ew_mean(cfg: ExperimentConfig, data: MultimodalDataset, noise: float) -> Stepper:
    """``ew`` as FedMER set it up before session 13: Opacus' own ``loss_reduction="mean"`` path
    (every per-sample gradient scaled by the batch size, Opacus' ``DPOptimizer`` dividing back),
    for the side-by-side with FedMER's summed loss (:mod:`fedmer.privacy.dp_optimizer`)."""
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, data).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.federation.lr, momentum=MOMENTUM)
    loader = make_loader(data, cfg.federation.batch_size, cfg.seed)
    wrapped, dp_opt, _loader = PrivacyEngine().make_private(
        module=SampleLosses(model), optimizer=opt, data_loader=loader,
        noise_multiplier=noise, max_grad_norm=cfg.privacy.max_grad_norm, poisson_sampling=True,
        grad_sample_mode="ew", loss_reduction="mean",
    )  # fmt: skip
    return Stepper("ew-mean", _timed_step(wrapped, dp_opt))


def _ew_group(cfg: ExperimentConfig, data: MultimodalDataset, noise: float) -> Stepper:
    """``ew`` with torch's other ``Conv1d`` per-sample gradient: a convolution grouped over the
    batch, which torch uses below ``conv_utils.THRESHOLD`` (32) samples and ``unfold`` + ``einsum``
    above; forced here for the batch of 128 during this stepper's steps only."""
    from torch.nn.utils._expanded_weights import conv_utils

    inner = _private(cfg, data, "ew", noise).step

    def step(batch: Sequence[torch.Tensor]) -> tuple[float, float, float]:
        saved, conv_utils.THRESHOLD = conv_utils.THRESHOLD, 1 << 30
        try:
            return inner(batch)
        finally:
            conv_utils.THRESHOLD = saved

    return Stepper("ew-group", step)


def _ghost(cfg: ExperimentConfig, data: MultimodalDataset, noise: float, contiguous: bool) -> Stepper:
    """Opacus' ghost clipping (two backward passes), driven as its docs say, on the per-sample losses.

    ``contiguous``: the attention fusion looks its modality embeddings up with a batch-expanded
    (stride 0) index, which ghost clipping's embedding norm cannot ``view``; a forward pre-hook
    here (not in the model) hands the embedding a contiguous copy instead.
    """
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, data).train()
    if contiguous:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.register_forward_pre_hook(lambda _m, args: tuple(a.contiguous() for a in args))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.federation.lr, momentum=MOMENTUM)
    loader = make_loader(data, cfg.federation.batch_size, cfg.seed)
    wrapped, dp_opt, _criterion, _loader = PrivacyEngine().make_private(
        module=SampleLosses(model), optimizer=opt, data_loader=loader,
        criterion=nn.CrossEntropyLoss(), noise_multiplier=noise, max_grad_norm=cfg.privacy.max_grad_norm,
        poisson_sampling=True, grad_sample_mode="ghost",
    )  # fmt: skip

    def step(batch: Sequence[torch.Tensor]) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        dp_opt.zero_grad(set_to_none=True)
        loss = DPTensorFastGradientClipping(wrapped, dp_opt, wrapped(*batch), "mean")
        t1 = time.perf_counter()
        loss.backward()  # both of ghost clipping's passes
        t2 = time.perf_counter()
        dp_opt.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return Stepper("ghost*" if contiguous else "ghost", step)


def _batches(data: MultimodalDataset, batch_size: int, count: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` full batches of the default size (the expected Poisson batch), fixed for every mode."""
    loader = make_loader(data, batch_size, seed=0)
    out: list[tuple[torch.Tensor, ...]] = []
    while len(out) < count:
        out.extend(tuple(b) for b in loader if len(b[0]) == batch_size)
    return out[:count]


def time_steps(
    cfg: ExperimentConfig, data: MultimodalDataset, noise: float, rounds: int, block: int, warmup: int
) -> tuple[dict[str, dict], dict[str, str]]:
    """Per mode: median step and phase times (ms) and the ratio to the non-private step; and failures.

    Each round runs ``block`` consecutive steps of each mode in turn (as training runs them: one
    model's steps back to back, its per-sample gradients warm in cache); the ratio is the median
    over rounds of the mode's median step over the non-private median step of the same round.
    """
    steppers: list[Stepper] = [_plain(cfg, data)]
    failed: dict[str, str] = {}
    batches = _batches(data, cfg.federation.batch_size, 4)
    for mode in MODES:
        try:
            stepper = (
                _ghost(cfg, data, noise, contiguous=mode == "ghost*")
                if mode.startswith("ghost")
                else _ew_group(cfg, data, noise)
                if mode == "ew-group"
                else _ew_mean(cfg, data, noise)
                if mode == "ew-mean"
                else _private(cfg, data, mode, noise)
            )
            stepper.step(batches[0])  # fails here, if it fails
            steppers.append(stepper)
        except Exception as err:
            failed[mode] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    times: dict[str, list[tuple[float, float, float]]] = {s.name: [] for s in steppers}
    per_round: dict[str, list[float]] = {s.name: [] for s in steppers}
    for r in range(warmup + rounds):
        for s in steppers:
            block_times = [s.step(batches[i % len(batches)]) for i in range(block)]
            if r >= warmup:
                times[s.name].extend(block_times)
                per_round[s.name].append(statistics.median(sum(p) for p in block_times))
    totals = {name: [sum(p) for p in v] for name, v in times.items()}
    base = per_round[NON_PRIVATE]
    out = {}
    for name, v in times.items():
        out[name] = {
            "ms": 1e3 * statistics.median(totals[name]),
            "ms_p25_p75": [1e3 * q for q in _quartiles(totals[name])],
            "forward_ms": 1e3 * statistics.median(p[0] for p in v),
            "backward_ms": 1e3 * statistics.median(p[1] for p in v),
            "optimizer_ms": 1e3 * statistics.median(p[2] for p in v),
            "ratio": statistics.median(t / b for t, b in zip(per_round[name], base, strict=True)),
        }
    return out, failed


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def time_local_rounds(
    cfg: ExperimentConfig,
    data: MultimodalDataset,
    noise: float,
    repeats: int,
    modes: Sequence[str] = (NON_PRIVATE, *GRAD_SAMPLE_MODES),
) -> dict[str, dict]:
    """One client's whole local round (``train_local``) per mode in ``modes`` (the first must be
    non-private: the ratios' base), interleaved."""
    recipe = local_recipe(cfg, len(data))
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeats + 1):
        for mode in modes:
            torch.manual_seed(cfg.seed)
            model = build_model_for(cfg, data)
            dp = None
            if mode != NON_PRIVATE:
                dp = DPSGD(noise, cfg.privacy.max_grad_norm, grad_sample_mode=mode)
            t0 = time.perf_counter()
            out = train_local(
                model, data, epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=r, dp=dp
            )
            if r:  # the first repeat is a warm-up
                times[mode].append(time.perf_counter() - t0)
    steps = out.train.steps
    base = times[NON_PRIVATE]
    return {
        m: {
            "ms": 1e3 * statistics.median(v),
            "steps": steps,
            "ratio": statistics.median(t / b for t, b in zip(v, base, strict=True)),
        }
        for m, v in times.items()
    }


#: Model families (configs/model/ presets' encoder / fusion / auxiliary loss) for ``--families``.
FAMILIES: dict[str, dict[str, str]] = {
    "attention (default)": {},
    "late": {"fusion": "late"},
    "coattention": {"fusion": "coattention"},
    "transformer": {"fusion": "transformer"},
    "gated": {"fusion": "gated"},
    "dcca": {"fusion": "concat", "aux_loss": "cca"},
    "contrastive": {"aux_loss": "contrastive"},
    "gru": {"encoder": "gru"},
    "crnn": {"encoder": "crnn"},
    "functionals": {"encoder": "functionals", "fusion": "concat"},
}


def time_families(
    cfg: ExperimentConfig, data: MultimodalDataset, noise: float, repeats: int
) -> dict[str, dict]:
    """A local round of each model family, non-private, book-keeping and expanded weights."""
    out = {}
    print(f"\none local round per model family, median of {repeats} (ratio to non-private)")
    for family, overrides in FAMILIES.items():
        family_cfg = replace(cfg, model=replace(cfg.model, **overrides))  # type: ignore[arg-type]
        rounds = time_local_rounds(family_cfg, data, noise, repeats, (NON_PRIVATE, "bk", "ew"))
        out[family] = rounds
        cells = "  ".join(f"{m} {r['ratio']:.2f}x" for m, r in rounds.items() if m != NON_PRIVATE)
        print(f"{family:<20} non-private {rounds[NON_PRIVATE]['ms']:>6.1f} ms  {cells}", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (after warm-up)")
    parser.add_argument("--block", type=int, default=5, help="consecutive steps of each mode per round")
    parser.add_argument("--warmup", type=int, default=1, help="rounds left out first")
    parser.add_argument("--local-rounds", type=int, default=7, help="timed train_local calls per mode")
    parser.add_argument(
        "--families", action="store_true",
        help="also a local round of every model family (configs/model/), non-private, bk and ew",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    given = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(given)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG advice, hooks on input layers
    torch.set_num_threads(THREADS)
    cfg = compose_experiment([])  # what `make run` composes from configs/
    data = load_client_dataset(cfg, 0)
    noise = local_recipe(cfg, len(data)).noise_multiplier
    model = build_model_for(cfg, data)
    print(
        f"default model {cfg.model.encoder}/{cfg.model.fusion}, {count_parameters(model)} parameters; "
        f"client 0: {len(data)} samples, batch {cfg.federation.batch_size}, noise {noise:.3f}; "
        f"torch {torch.__version__} ({THREADS} thread), opacus {opacus.__version__}"
    )
    steps, failed = time_steps(cfg, data, noise, args.rounds, args.block, args.warmup)
    print(
        f"\none optimisation step: {args.rounds} rounds of {args.block} consecutive steps per mode, "
        f"interleaved, after {args.warmup} warm-up round(s); medians"
    )
    print(f"{'mode':<12} {'ms/step':>8} {'p25-p75':>13} {'fwd':>7} {'bwd':>7} {'opt':>7} {'ratio':>6}")
    for name, r in steps.items():
        lo, hi = r["ms_p25_p75"]
        print(
            f"{name:<12} {r['ms']:>8.1f} {f'{lo:.0f}-{hi:.0f}':>13} {r['forward_ms']:>7.1f} "
            f"{r['backward_ms']:>7.1f} {r['optimizer_ms']:>7.1f} {r['ratio']:>5.2f}x"
        )
    for mode, err in failed.items():
        print(f"{mode:<12} fails: {err}")
    local = time_local_rounds(cfg, data, noise, args.local_rounds) if args.local_rounds > 0 else {}
    if local:
        steps_per_round = next(iter(local.values()))["steps"]
        print(f"\none local round (train_local, {steps_per_round} steps), median of {args.local_rounds}")
        for name, r in local.items():
            print(f"{name:<12} {r['ms']:>8.1f} ms {r['ratio']:>5.2f}x")
    families = time_families(cfg, data, noise, args.local_rounds) if args.families else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(["python -m bench.dp_step", *given]),
                "rounds": args.rounds,
                "block": args.block,
                "warmup": args.warmup,
                "threads": THREADS,
                "model": f"{cfg.model.encoder}/{cfg.model.fusion}",
                "parameters": count_parameters(model),
                "batch_size": cfg.federation.batch_size,
                "noise_multiplier": noise,
                "torch": torch.__version__,
                "opacus": opacus.__version__,
                "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
                "step": steps,
                "failed": failed,
                "local_round": local,
                "families_local_round": families,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
