"""End to end: a real Flower simulation (Ray, ServerApp, ClientApps, Opacus) through the CLI."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import run_cli as _run_cli  # the quick_run fixture is shared from there

pytestmark = pytest.mark.e2e


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_result_files_are_written(quick_run: Path) -> None:
    for name in (
        "rounds.jsonl",
        "rounds.csv",
        "summary.json",
        "config.json",
        "model.pt",
        "learning_curve.png",
    ):
        assert (quick_run / name).stat().st_size > 0, name
    with open(quick_run / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    summary = json.loads((quick_run / "summary.json").read_text())
    assert summary["clients_failed_total"] == 0 and summary["clients_rejected_total"] == 0
    assert summary["status"] == "ok" and summary["failure"] is None and summary["aggregates_rejected"] == []
    assert summary["privacy"]["accountant"] == "rdp" and summary["privacy"]["delta"] == 1e-5
    assert summary["privacy"]["unit"].startswith("sample")


def test_epsilon_accumulates_across_rounds(quick_run: Path) -> None:
    rows = _rows(quick_run)
    eps = [r["epsilon_max"] for r in rows]
    assert eps[0] == 0.0 and 0.0 < eps[1] < eps[2] <= 8.0
    for r in rows[1:]:
        assert r["clients_replied"] == 3 and r["clients_failed"] == 0 and r["delta"] == 1e-5
        assert set(r["client_epsilons"]) == {"0", "1", "2"}
    # every client trained in both rounds, so every client's epsilon grew
    assert all(rows[2]["client_epsilons"][k] > rows[1]["client_epsilons"][k] for k in ("0", "1", "2"))


def test_metrics_are_sane(quick_run: Path) -> None:
    final = _rows(quick_run)[-1]
    assert 0.0 <= final["uar"] <= 1.0 and math.isfinite(final["loss"])
    assert len(final["per_class_recall"]) == 5 and len(final["confusion"]) == 5


def test_same_seed_same_metrics_also_on_a_sweeps_reused_ray_actors(quick_run: Path, tmp_path: Path) -> None:
    """Two jobs of one ``-m`` sweep with seed 7 match the stand-alone run with seed 7: the second
    job runs on the first job's Ray session and actors (simulations/ray_session.py), and reuse
    changes no metric. Also: an ``output.dir`` holding ``{run_id}`` gets Flower's run id."""
    from tests.e2e.conftest import QUICK

    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "simulations.run", "-m", *QUICK, "seed=7,7"]
    cmd += [f"output.dir='{runs}/{{run_id}}'", f"hydra.sweep.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(re.findall(r"reusing Ray and \d+ ClientApp actors", proc.stdout + proc.stderr)) == 1
    outs = sorted(runs.iterdir())
    assert len(outs) == 2 and all(o.name.isdigit() and o.name != "0" for o in outs)
    keys = ("uar", "accuracy", "macro_f1", "loss", "epsilon_max", "confusion", "client_epsilons")
    for out in outs:
        assert f"results: {out}" in proc.stdout + proc.stderr
        for a, b in zip(_rows(quick_run), _rows(out), strict=True):
            assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_bad_config_stops_before_training(tmp_path: Path) -> None:
    proc = _run_cli(tmp_path, "strategy.name=fedsgd")
    assert proc.returncode == 2
    assert "invalid strategy.name='fedsgd': expected one of" in proc.stderr + proc.stdout
    assert not (tmp_path / "rounds.jsonl").exists()


def test_unsampled_clients_spend_nothing(tmp_path: Path) -> None:
    """Half the clients per round: a client's epsilon moves only in rounds it trained in."""
    proc = _run_cli(
        tmp_path,
        "federation.num_clients=4",
        "federation.fraction_train=0.5",
        "federation.num_rounds=3",
        "federation.fraction_evaluate=0.0",
        "seed=3",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rows(tmp_path)[1:]
    assert all(r["clients_sampled"] == 2 and r["clients_replied"] == 2 for r in rows)
    last: dict[str, float] = {}
    participation: dict[str, int] = {}
    for r in rows:
        for pid, eps in r["client_epsilons"].items():
            assert eps > last.get(pid, 0.0)  # grows when it trains ...
            last[pid] = eps
            participation[pid] = participation.get(pid, 0) + 1
    # ... and only then: equal sizes and noise, so epsilon is a function of rounds joined
    by_count: dict[int, set[float]] = {}
    for pid, eps in last.items():
        by_count.setdefault(participation[pid], set()).add(round(eps, 9))
    assert all(len(v) == 1 for v in by_count.values())
    counts = sorted(by_count)
    assert [min(by_count[c]) for c in counts] == sorted(min(by_count[c]) for c in counts)


def test_client_level_dp_reports_flowers_accounted_epsilon(tmp_path: Path) -> None:
    """privacy=client: Flower's wrapper adds noise; its epsilon matches dp_accounting's RDP."""
    import dp_accounting

    proc = _run_cli(tmp_path, "privacy=client", "privacy.client_noise_multiplier=2.0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rows(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["privacy"]["client_level"]["unit"].startswith("one whole client")
    for r in rows[1:]:
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.GaussianDpEvent(2.0), r["round"])  # no amplification: every round counts
        assert r["client_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
        assert r["epsilon_max"] == "inf"  # no DP-SGD inside clients in this mode (JSON has no inf)


def test_a_node_over_its_cap_refuses_and_the_run_goes_on(tmp_path: Path) -> None:
    """Cap just above one round's spend: a node sampled twice refuses; the others still train."""
    proc = _run_cli(
        tmp_path,
        "federation.num_clients=4",
        "federation.fraction_train=0.5",
        "federation.fraction_evaluate=0",
        "federation.batch_size=128",
        "federation.local_epochs=2",
        "privacy.budget_cap=5.4",
        "seed=3",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = _rows(tmp_path)[-1]
    assert last["clients_refused"] == 1 and last["clients_replied"] == 1 and last["clients_failed"] == 0
    assert "privacy budget exceeded" in last["refusals"][0] and "cap of 5.4" in last["refusals"][0]
    refused = last["refusals"][0].split("node 'client-")[1].split("'")[0]
    ledger = tmp_path / "ledgers" / f"client-{refused}.json"
    shown = subprocess.run(
        [sys.executable, "-m", "fedmer.cli", "privacy", "show", str(ledger)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # one round spent, the refused one not: what the node reported when it trained, under the cap
    reported = {r["client_epsilons_lifetime"].get(refused) for r in _rows(tmp_path)[1:]} - {None}
    assert len(reported) == 1 and 5.0 < (spent := reported.pop()) < 5.4
    assert shown.returncode == 0 and f"epsilon = {spent:.3f} at delta" in shown.stdout, shown.stdout


def test_hydra_multirun_sweep_writes_one_run_per_job_and_a_bad_job_stops_only_itself(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        "-m",
        "+experiment=smoke",
        "seed=0,-1,1",  # job 1 is invalid: it fails alone, the sweep goes on and ends non-zero
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "invalid seed=-1" in proc.stderr
    seeds = [
        json.loads((tmp_path / str(job) / "config.json").read_text())["run_config"]["seed"] for job in (0, 2)
    ]
    assert seeds == [0, 1]
    assert all((tmp_path / str(job) / "summary.json").exists() for job in (0, 2))
    assert not (tmp_path / "1" / "summary.json").exists()
    report = subprocess.run(
        [sys.executable, "-m", "fedmer.cli", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    with open(tmp_path / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    assert sorted(r["seed"] for r in runs) == ["0", "1"] and all(r["delta"] == "1e-05" for r in runs)
    text = (tmp_path / "report.md").read_text()
    assert "| synthetic driving | sample | fedavg | 3 (3) | 8 | 2 |" in text  # 3 clients, all sampled
    assert (tmp_path / "uar_vs_epsilon.png").stat().st_size > 0


def test_federated_standardisation_is_released_accounted_and_carried_by_the_model(tmp_path: Path) -> None:
    """data.standardize=federated in a real simulation: every node releases once (ledger round 0),
    the server writes the statistics and the final model standardises with exactly them."""
    import torch

    from fedmer.data.feature_stats import read_feature_stats
    from fedmer.privacy.engine import PrivacyHistory, compute_epsilon

    proc = _run_cli(tmp_path, "data.standardize=federated", "model.encoder=functionals", "seed=5")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    released = summary["feature_stats"]
    assert released["clients"] == [0, 1, 2] and released["failures"] == []
    sigma = released["noise_multiplier"]
    assert sigma > 0 and released["clip_norm"] == 20.0
    stats = read_feature_stats(tmp_path / "feature_stats.json")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.testing.assert_close(state["standardizer.shift"], torch.tensor(stats.mean, dtype=torch.float32))
    torch.testing.assert_close(state["standardizer.scale"], 1 / torch.tensor(stats.std, dtype=torch.float32))
    last = _rows(tmp_path)[-1]
    for pid in range(3):
        ledger = json.loads((tmp_path / "ledgers" / f"client-{pid}.json").read_text())["entries"]
        assert (ledger["noise"][0], ledger["rate"][0], ledger["steps"][0], ledger["round"][0]) == (
            sigma,
            1.0,
            1,
            0,
        )
        history = PrivacyHistory(tuple(zip(ledger["noise"], ledger["rate"], ledger["steps"], strict=True)))
        spent = compute_epsilon(history, 1e-5)
        assert spent <= 8.0 and last["client_epsilons"][str(pid)] == pytest.approx(spent)


def test_the_sequential_grid_reproduces_the_ray_simulation(quick_run: Path, tmp_path: Path) -> None:
    """The one-process yardstick of bench/orchestration.py runs the same client work: same metrics."""
    from client.app import app as client_app
    from server.app import run_server
    from simulations.compose import compose_experiment
    from simulations.sequential import SequentialGrid
    from tests.e2e.conftest import QUICK

    cfg = compose_experiment([*QUICK, "seed=7"], output_dir=tmp_path)
    grid = SequentialGrid(client_app, cfg.federation.num_clients, cfg.to_run_config())
    run_server(grid, cfg)
    keys = ("uar", "accuracy", "macro_f1", "loss", "epsilon_max", "confusion", "client_epsilons")
    for a, b in zip(_rows(quick_run), _rows(tmp_path), strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    trains = [kind for kind, _ in grid.calls if kind.startswith("train")]
    assert len(trains) == cfg.federation.num_rounds * cfg.federation.clients_per_round
