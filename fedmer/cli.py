"""The ``fedmer`` command.

fedmer run [hydra overrides...]       one simulation (same as python -m simulations.run)
fedmer run -m key=a,b ...             a Hydra multirun sweep
fedmer privacy show LEDGER [--json]   a node's persistent privacy budget (spent epsilon, cap)
fedmer audit RUN_DIR [--client N]     membership-inference audit of a finished run's global model
fedmer report SWEEP_DIR [--out DIR]   tidy CSVs + Markdown report with plots for a sweep
fedmer missing RUN_DIR                the global model with modalities missing at test time
fedmer explain RUN_DIR [--n N]        per-prediction modality contributions (weights, ablation)
fedmer personalize RUN_DIR            per-client DP fine-tune of the fusion head, ledger-accounted
fedmer export MODEL [--int8]          ONNX (+ int8, TorchScript) of a model bundle, checked against PyTorch
fedmer predict MODEL AUDIO [--stream] a recording's emotion, modality contributions and latency
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

__all__ = ["COMMAND_GROUP", "main"]

#: Entry-point group of commands that live outside the library (``run`` is Hydra's, in
#: ``simulations/``): the library never imports an app, the app registers itself here.
COMMAND_GROUP = "fedmer.commands"

_COMMANDS = {
    "run": "run a federated simulation (Hydra overrides follow)",
    "privacy": "inspect a node's privacy ledger: fedmer privacy show LEDGER [--json]",
    "report": "tidy CSVs and a Markdown report for a sweep: fedmer report SWEEP_DIR [--out DIR]",
    "audit": "membership-inference audit of a finished run: fedmer audit RUN_DIR [--client N] [--shadows K]",
    "missing": "missing modalities at test time: fedmer missing RUN_DIR [--rates R ...] [--draws K]",
    "explain": "modality contributions of predictions: fedmer explain RUN_DIR [--index I ...|--n N]",
    "personalize": "per-client head fine-tune with DP: fedmer personalize RUN_DIR [--epochs E] [--no-dp]",
    "export": "ONNX (+int8, TorchScript) of a model bundle: fedmer export MODEL [--out DIR] [--int8]",
    "deploy": "a secured federation: fedmer deploy {keys,superlink,register,supernode,submit,demo} ...",
    "predict": "emotion of a recording: fedmer predict MODEL AUDIO... [--face CSV] [--onnx F] [--stream]",
}


def _privacy(argv: list[str]) -> int:
    """``fedmer privacy show``: a bad or missing ledger is one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(prog="fedmer privacy", description="A node's persistent privacy budget")
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="spent epsilon, cap, runs and rounds of one ledger file")
    show.add_argument("ledger", help="path of the node's ledger JSON file")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)

    from fedmer.privacy.ledger import LedgerError, ledger_summary, show_ledger

    try:
        out = json.dumps(ledger_summary(args.ledger), indent=2) if args.json else show_ledger(args.ledger)
    except LedgerError as err:
        print(f"fedmer privacy: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _report(argv: list[str]) -> int:
    """``fedmer report``: a folder without finished runs is one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(prog="fedmer report", description="Report on a sweep of runs")
    parser.add_argument("sweep_dir", help="a Hydra multirun folder (or any folder of run folders)")
    parser.add_argument("--out", default=None, help="where to write the report (default: the sweep folder)")
    args = parser.parse_args(argv)

    from fedmer.results.report import write_report

    try:
        print(write_report(args.sweep_dir, args.out))
    except FileNotFoundError as err:
        print(f"fedmer report: {err}", file=sys.stderr)
        return 2
    return 0


def _run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("run_dir", type=Path, help="a finished run folder (config.json, model.pt)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the run folder)")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of a table")
    return parser


def _post_hoc(
    prog: str, run: Callable[[], dict], format_table: Callable[[dict], str], args: argparse.Namespace
) -> int:
    """Run one post-hoc tool; a bad run folder or setting is one line on stderr and exit code 2."""
    import torch

    from fedmer.results.reader import RunError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # tiny models: one thread is faster, much faster on a busy machine
    try:
        report = run()
    except (RunError, ValueError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if not args.json:
        print(f"wrote into {args.out or args.run_dir}")
    return 0


def _missing(argv: list[str]) -> int:
    parser = _run_parser("fedmer missing", "Score a run's global model with modalities missing at test time")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--draws", type=int, default=5, help="random draws per rate (mean and sd reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from fedmer.posthoc.missing.report import format_table, missing_run

    def run() -> dict:
        return missing_run(args.run_dir, args.out, rates=args.rates, draws=args.draws, seed=args.seed)

    return _post_hoc("fedmer missing", run, format_table, args)


def _explain(argv: list[str]) -> int:
    parser = _run_parser("fedmer explain", "Per-prediction modality contributions of a run's global model")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, nargs="+", help="test-split indices to explain")
    which.add_argument("--n", type=int, default=6, help="explain N test samples drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random choice of samples")
    args = parser.parse_args(argv)
    from fedmer.posthoc.explain.report import explain_run, format_explanations

    def run() -> dict:
        return explain_run(args.run_dir, args.out, indices=args.index, n=args.n, seed=args.seed)

    return _post_hoc("fedmer explain", run, format_explanations, args)


def _personalize(argv: list[str]) -> int:
    parser = _run_parser("fedmer personalize", "Per-client fine-tune of the fusion head, DP-accounted")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=None, help="default: the run's federation.lr")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    parser.add_argument("--target-epsilon", type=float, default=1.0, help="epsilon of the fine-tune alone")
    parser.add_argument("--delta", type=float, default=None, help="must equal the run's delta (default)")
    parser.add_argument("--cap", type=float, default=None, help="replace the ledgers' epsilon cap")
    parser.add_argument("--ledger-dir", type=Path, default=None, help="default: RUN_DIR/ledgers")
    parser.add_argument("--no-dp", action="store_true", help="non-private fine-tune, for comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from fedmer.posthoc.personalize.finetune import PersonalizeSettings
    from fedmer.posthoc.personalize.report import format_table, personalize_run

    def run() -> dict:
        settings = PersonalizeSettings(
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            target_epsilon=args.target_epsilon,
            delta=args.delta,
            dp=not args.no_dp,
            cap=args.cap,
            seed=args.seed,
        )
        return personalize_run(args.run_dir, settings, args.out, ledger_dir=args.ledger_dir)

    return _post_hoc("fedmer personalize", run, format_table, args)


def _audit(argv: list[str]) -> int:
    """``fedmer audit``: membership-inference audit; writes RUN_DIR/audit.json and audit_roc.png."""
    parser = argparse.ArgumentParser(
        prog="fedmer audit",
        description="Membership-inference audit (loss threshold, LiRA) of a run's final global model",
    )
    parser.add_argument("run_dir", type=Path, help="run folder holding config.json and model.pt")
    parser.add_argument("--client", type=int, default=0, help="client whose training data are the members")
    parser.add_argument("--shadows", type=int, default=8, help="LiRA shadow models (0: loss attack only)")
    parser.add_argument("--seed", type=int, default=0, help="seeds subsampling, shadow splits, bootstrap")
    parser.add_argument(
        "--no-background",
        action="store_true",
        help="train shadows on the candidates only (attacker without the other clients' data)",
    )
    parser.add_argument("--json", action="store_true", help="print the audit report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from fedmer.posthoc.audit import AuditError, audit_run, format_table
    from fedmer.results.layout import AUDIT_JSON, AUDIT_PNG

    try:
        report = audit_run(
            args.run_dir,
            client=args.client,
            shadows=args.shadows,
            seed=args.seed,
            background=not args.no_background,
        )
    except AuditError as err:
        print(f"fedmer audit: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        print(f"wrote {args.run_dir / AUDIT_JSON} and {args.run_dir / AUDIT_PNG}")
    return 0


def _edge_error(prog: str, err: Exception) -> int:
    print(f"{prog}: {err}", file=sys.stderr)
    return 2


def _predict(argv: list[str]) -> int:
    """``fedmer predict``: a recording's emotion, modality contributions and latency; or a stream."""
    parser = argparse.ArgumentParser(
        prog="fedmer predict", description="Classify a recording with a model bundle"
    )
    parser.add_argument(
        "model", type=Path, help="a model bundle (model_bundle.pt) or a run folder holding one"
    )
    parser.add_argument(
        "audio", type=Path, nargs="+", help="16 kHz mono audio; several = one stream, in order"
    )
    parser.add_argument(
        "--face", type=Path, default=None, help="RAVDESS-style face_features.csv (its row for the clip)"
    )
    parser.add_argument(
        "--onnx", type=Path, default=None, help="run this exported .onnx (float or int8), not PyTorch"
    )
    parser.add_argument("--stream", action="store_true", help="slide a window over the (concatenated) audio")
    parser.add_argument("--window", type=float, default=3.0, help="stream window, seconds")
    parser.add_argument("--hop", type=float, default=1.0, help="stream hop, seconds")
    parser.add_argument("--gap", type=float, default=0.0, help="silence between concatenated files, seconds")
    parser.add_argument("--out", type=Path, default=Path("predict_stream"), help="stream: CSV + PNG folder")
    parser.add_argument("--repeats", type=int, default=20, help="runs per latency median (one clip)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from fedmer.edge import predict as ep
    from fedmer.edge.bundle import open_bundle
    from fedmer.edge.recording import concat_recordings, read_face_row

    torch.set_num_threads(1)  # an edge core; also what the latency figures mean
    try:
        bundle = open_bundle(args.model)
        if len(args.audio) > 1 and not args.stream:
            raise ValueError("several audio files are one stream: add --stream")
        recording = concat_recordings(args.audio, args.gap)
        face = None if args.face is None else read_face_row(bundle.meta, args.face, args.audio[0])
        logits_fn, backend = ep.torch_logits(bundle), "torch, 1 thread"
        if args.onnx is not None:
            from fedmer.edge.export import OnnxModel

            if not args.onnx.is_file():
                raise ValueError(f"no ONNX file at {args.onnx}")
            logits_fn, backend = OnnxModel(args.onnx).logits, f"onnxruntime {args.onnx.name}, 1 thread"
        if not args.stream:
            print(ep.format_clip(ep.predict_clip(bundle, recording, face, logits_fn, args.repeats), backend))
            return 0
        windows = ep.predict_stream(bundle, recording, args.window, args.hop, face, logits_fn)
    except (ValueError, OSError) as err:  # BundleError and RecordingError are ValueErrors
        return _edge_error("fedmer predict", err)
    for w in windows:
        print(ep.format_window(w))
    args.out.mkdir(parents=True, exist_ok=True)
    names = bundle.meta.class_names
    csv_path = ep.write_stream_csv(windows, names, args.out / "stream.csv")
    png_path = ep.plot_timeline(windows, recording, names, args.out / "stream.png")
    median = sorted(w.features_ms + w.model_ms for w in windows)[len(windows) // 2]
    print(f"{len(windows)} windows, median {median:.2f} ms each; wrote {csv_path}, {png_path}")
    return 0


def _export(argv: list[str]) -> int:
    """``fedmer export``: ONNX (+ int8, + TorchScript) of a bundle, checked against PyTorch."""
    parser = argparse.ArgumentParser(
        prog="fedmer export", description="Export a model bundle for edge inference"
    )
    parser.add_argument(
        "model", type=Path, help="a model bundle (model_bundle.pt) or a run folder holding one"
    )
    parser.add_argument("--out", type=Path, default=Path("edge_export"), help="output folder")
    parser.add_argument("--int8", action="store_true", help="also write a dynamically int8-quantised ONNX")
    parser.add_argument("--torchscript", action="store_true", help="also write a traced TorchScript model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fedmer.edge.bundle import open_bundle
    from fedmer.edge.export import export_model

    try:
        report = export_model(open_bundle(args.model), args.out, int8=args.int8, torchscript=args.torchscript)
    except (ValueError, OSError) as err:
        return _edge_error("fedmer export", err)
    print(json.dumps(report, indent=2))
    return 0


def _plugin(command: str) -> Callable[[list[str]], int] | None:
    """A command registered by an app under :data:`COMMAND_GROUP` (``run``), if installed."""
    for ep in entry_points(group=COMMAND_GROUP):
        if ep.name == command:
            fn: Callable[[list[str]], int] = ep.load()
            return fn
    return None


def _deploy(argv: list[str]) -> int:
    from fedmer.deployment.cli import main as deploy_main

    return deploy_main(argv)


_HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "privacy": _privacy,
    "report": _report,
    "audit": _audit,
    "missing": _missing,
    "explain": _explain,
    "personalize": _personalize,
    "export": _export,
    "predict": _predict,
    "deploy": _deploy,
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch a subcommand; unknown ones get the list of valid ones."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser = argparse.ArgumentParser(
            prog="fedmer", description="Federated multimodal emotion recognition"
        )
        parser.add_argument(
            "command", choices=sorted(_COMMANDS), help="; ".join(f"{k}: {v}" for k, v in _COMMANDS.items())
        )
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(
            f"fedmer: unknown command {command!r}; valid commands: {', '.join(sorted(_COMMANDS))}",
            file=sys.stderr,
        )
        return 2
    if command in _HANDLERS:
        return _HANDLERS[command](rest)
    plugin = _plugin(command)
    if plugin is None:
        print(
            f"fedmer {command}: not installed (no {COMMAND_GROUP!r} entry point named {command!r}); "
            "reinstall the project with `pip install -e .` (make setup)",
            file=sys.stderr,
        )
        return 2
    return plugin(rest)


if __name__ == "__main__":
    raise SystemExit(main())
