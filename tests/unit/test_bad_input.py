"""Bad input, tried widely, fails early and clearly on every entry path (issue 11, point 6).

One table of invalid settings (wrong types, out-of-range values, ``inf``/``nan`` for every float
key where they are invalid, a target epsilon no run can meet, typos of real keys, names no registry
or config group holds) is driven through each real way a run is started:

* Hydra, as ``fedmer run key=value`` composes ``configs/`` and builds the experiment. A Hydra
  composition takes 0.1-0.3 s, so rows that set a known key are composed in batches (one
  composition per batch of distinct keys, which Hydra applies independently) and each key's value,
  as Hydra read it, is then validated alone on the defaults, as a run with that one override would
  be. Every unknown key or group option, and a sample of one row per kind of error, goes the whole
  way through ``fedmer.cli.main(["run", ...])`` in-process: exit code 2 and one line;
* ``flwr run . --run-config 'key=<TOML>'``: the text a user types, parsed by Flower's own
  ``parse_config_args`` as ``flwr run`` does, fused into pyproject.toml's defaults as the SuperLink
  does (``get_fused_config_from_dir``, which refuses undeclared keys), then given to the
  ServerApp's ``main`` (server/app.py) as its ``context.run_config``;
* ``fedmer deploy submit --connection nowhere --set key=value``, in-process.

Each must stop before any training with one line that names the key (and, from FedMER, the
value): no traceback, no silent acceptance, exit code 2 from the two commands. Neither a
simulation nor ``flwr run`` may start: the tests replace them with a tripwire, not the validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from omegaconf import DictConfig, OmegaConf

from fedmer import cli
from fedmer.config import ConfigError, ExperimentConfig
from tests.conftest import ROOT


@dataclass(frozen=True)
class Bad:
    """One invalid setting: ``key`` set to ``value`` (typed as Hydra and TOML both read it)."""

    key: str
    value: bool | int | float | str
    why: str

    @property
    def text(self) -> str:
        """As typed after ``fedmer run`` or ``--set``: true/false, a number, nan/inf, a bare word."""
        if isinstance(self.value, bool):
            return str(self.value).lower()
        return repr(self.value) if isinstance(self.value, float) else str(self.value)

    @property
    def toml(self) -> str:
        """As typed after ``flwr run --run-config``: TOML, so a string is quoted."""
        return f'"{self.value}"' if isinstance(self.value, str) else self.text

    def __str__(self) -> str:  # the test id
        return f"{self.key}={self.text}"


def _float_keys() -> list[str]:
    """Every float-valued run-config key (``privacy.noise_multiplier`` also takes "auto")."""
    exp = ExperimentConfig()
    return [
        f"{section.name}.{f.name}"
        for section in fields(exp)
        if is_dataclass(value := getattr(exp, section.name))
        for f in fields(value)
        if str(f.type) in ("float", "float | None")
    ]


#: Where infinity means something: epsilon inf = clipping without noise, a budget cap of inf = none.
INF_IS_VALID = {"privacy.target_epsilon", "privacy.budget_cap"}

EXPLICIT: list[Bad] = [
    # -- wrong types ------------------------------------------------------------------
    Bad("federation.num_rounds", "abc", "a string for an int"),
    Bad("federation.num_rounds", 2.5, "a fraction for an int"),
    Bad("federation.num_rounds", True, "a bool for an int"),
    Bad("federation.num_rounds", math.nan, "nan for an int"),
    Bad("federation.batch_size", math.inf, "inf for an int"),
    Bad("strategy.num_malicious", 1.5, "a fraction for an int"),
    Bad("seed", 1.5, "a fraction for the seed"),
    Bad("seed", True, "a bool for the seed"),
    Bad("federation.lr", "fast", "a string for a float"),
    Bad("federation.lr", True, "a bool for a float (float(True) is 1.0)"),
    Bad("privacy.target_epsilon", True, "a bool for epsilon (used to become epsilon 1)"),
    Bad("privacy.noise_multiplier", "loud", "a string for a number or auto"),
    Bad("privacy.noise_multiplier", True, "a bool for a number or auto"),
    Bad("data.complete_only", 1, "an int for a bool"),
    Bad("faults.within_bound", "yes", "a word for a bool"),
    # -- out of range -----------------------------------------------------------------
    Bad("privacy.target_epsilon", 1e-9, "a target no run can meet (failed inside Opacus after minutes)"),
    Bad("privacy.target_epsilon", 0.0, "epsilon 0"),
    Bad("privacy.target_epsilon", -1.0, "a negative epsilon"),
    Bad("privacy.delta", 1.0, "delta not below 1"),
    Bad("privacy.delta", 0.0, "delta 0"),
    Bad("privacy.stats_epsilon_fraction", 1.0, "the whole budget for statistics"),
    Bad("privacy.client_noise_multiplier", -1.0, "negative noise, even where unused"),
    Bad("privacy.update_clip_norm", -math.inf, "-inf clip norm"),
    Bad("federation.num_clients", 0, "no clients"),
    Bad("federation.num_clients", 1, "fewer clients than the strategy needs"),
    Bad("federation.num_rounds", -1, "negative rounds"),
    Bad("federation.min_train_clients", 11, "more than there are clients"),
    Bad("federation.min_available_clients", 11, "more than there are clients"),
    Bad("federation.fraction_train", 1.5, "a fraction above 1"),
    Bad("federation.fraction_train", 0.0, "nobody trains"),
    Bad("federation.max_failed_fraction", 1.5, "a fraction above 1"),
    Bad("partition.modality_missing_rate", 1.0, "every modality missing"),
    Bad("model.modality_dropout", -0.1, "a negative probability"),
    Bad("strategy.server_momentum", 1.0, "momentum 1"),
    Bad("strategy.trim_beta", 0.5, "trimming everything"),
    Bad("data.seq_len", 3, "too short for the encoders"),
    Bad("seed", -1, "a negative seed"),
    Bad("faults.failure_rate", 2.0, "a rate above 1"),
    Bad("faults.attacker_fraction", 0.2, "attackers without an attack"),
    # -- unknown keys: typos of real ones, and a section given as a key ---------------
    Bad("privacy.target_epsilom", 4.0, "a typo of privacy.target_epsilon"),
    Bad("federation.num_round", 5, "a typo of federation.num_rounds"),
    Bad("strategy.lr", 0.1, "a typo of strategy.server_lr"),
    Bad("model.fusions", "concat", "a typo of model.fusion"),
    Bad("strategy", "fedsgd", "a Hydra group option that does not exist (a section in the run config)"),
    Bad("model", "magic", "a Hydra group option that does not exist (a section in the run config)"),
    # -- names no registry or choice holds --------------------------------------------
    Bad("strategy.name", "fedsgd", "strategy"),
    Bad("model.fusion", "magic", "fusion"),
    Bad("model.encoder", "transformer9", "encoder"),
    Bad("model.aux_loss", "mystery", "auxiliary loss"),
    Bad("data.name", "imagenet", "dataset"),
    Bad("data.scenario", "factory", "synthetic scenario"),
    Bad("data.modalities", "smell", "modality"),
    Bad("data.audio_frontend", "wav2vec", "audio front-end"),
    Bad("data.text_encoder", "bert", "text encoder"),
    Bad("data.face_transform", "sigmoid", "face transform"),
    Bad("data.standardize", "zscore", "standardisation"),
    Bad("partition.scheme", "random", "partition scheme"),
    Bad("privacy.mode", "paranoid", "privacy unit"),
    Bad("privacy.accountant", "moments", "accountant"),
    Bad("privacy.recipe", "bogus", "recipe"),
    Bad("privacy.grad_sample_mode", "ghost", "per-sample gradient mode"),
    Bad("privacy.client_clipping", "dynamic", "client clipping"),
    Bad("privacy.client_clipping_side", "both", "clipping side"),
    Bad("faults.failure_mode", "explode", "failure mode"),
    Bad("faults.attack", "backdoor", "attack"),
]
#: inf and nan for every float key where they are invalid.
NON_FINITE: list[Bad] = [
    *(Bad(key, math.nan, "nan") for key in _float_keys()),
    *(Bad(key, math.inf, "inf") for key in _float_keys() if key not in INF_IS_VALID),
]
#: The table.
BAD = EXPLICIT + NON_FINITE

UNKNOWN = {
    "privacy.target_epsilom",
    "federation.num_round",
    "strategy.lr",
    "model.fusions",
    "strategy",
    "model",
}
#: Rows that set a known key (Hydra composes them; the experiment refuses them).
VALUES = [b for b in BAD if b.key not in UNKNOWN]
#: Rows run through the whole `fedmer run` command: Hydra's own errors, and one of each other kind.
COMMAND = [b for b in BAD if b.key in UNKNOWN] + [
    b
    for b in BAD
    if str(b)
    in {
        "federation.num_rounds=abc",
        "federation.lr=true",
        "federation.num_rounds=2.5",
        "privacy.target_epsilon=1e-09",
        "federation.fraction_train=1.5",
        "faults.attacker_fraction=0.2",
        "privacy.update_clip_norm=inf",
        "privacy.delta=nan",
        "model.fusion=magic",
        "data.name=imagenet",
    }
]


def test_the_table_is_wide() -> None:
    assert len(BAD) >= 30 and len({str(b) for b in BAD}) == len(BAD)
    assert len(COMMAND) == len(UNKNOWN) + 10
    assert len(_float_keys()) >= 25  # every float key got its nan (and inf) row
    for key in UNKNOWN:
        assert key not in ExperimentConfig().to_run_config()


def _one_clear_line(text: str, bad: Bad, prefix: str) -> str:
    """The one line the command printed: it names the key and the value, and is not a traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in text
    assert bad.key in lines[0] and repr(bad.value) in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedmer run``'s Hydra app, which would start a simulation, refuses to be reached; and no
    Ray starts early in this test process (a subprocess test covers that path:
    ``tests/e2e/test_ray_start.py``)."""
    import simulations.run
    from simulations.ray_start import REUSE_ENV

    def tripwire() -> None:
        raise AssertionError("the invalid config reached the simulation")

    monkeypatch.setattr(simulations.run, "main", tripwire)
    monkeypatch.setenv(REUSE_ENV, "0")


@pytest.mark.parametrize("bad", COMMAND, ids=str)
def test_fedmer_run_refuses_it_in_one_line_with_exit_2(
    bad: Bad, no_simulation: None, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["run", f"{bad.key}={bad.text}"])
    out = capsys.readouterr()
    assert rc == 2, bad.why
    assert out.out == ""
    _one_clear_line(out.err, bad, "fedmer run: configuration error: ")


def _distinct_key_batches(rows: list[Bad]) -> list[list[Bad]]:
    batches: list[list[Bad]] = []
    for row in rows:
        batch = next((b for b in batches if row.key not in {r.key for r in b}), None)
        if batch is None:
            batches.append(batch := [])
        batch.append(row)
    return batches


@pytest.fixture(scope="module")
def hydra_read() -> tuple[DictConfig, dict[str, Any]]:
    """configs/ composed as `fedmer run` composes it, and each row's value as Hydra read its text."""
    from simulations.compose import compose_config

    read = {}
    for batch in _distinct_key_batches(VALUES):
        composed = compose_config([str(b) for b in batch])
        read.update({str(b): OmegaConf.select(composed, b.key) for b in batch})
    return compose_config([]), read


@pytest.mark.parametrize("bad", VALUES, ids=str)
def test_hydra_reads_the_value_and_the_experiment_refuses_it(
    bad: Bad, hydra_read: tuple[DictConfig, dict[str, Any]]
) -> None:
    from simulations.compose import experiment_from_hydra

    defaults, read = hydra_read
    value = read[str(bad)]
    assert type(value) is type(bad.value) and repr(value) == repr(bad.value)  # "nan" -> float nan, ...
    cfg = defaults.copy()  # the defaults with this one key set: what `fedmer run key=value` composes
    OmegaConf.update(cfg, bad.key, value)
    with pytest.raises(ConfigError) as err:
        experiment_from_hydra(cfg)
    message = str(err.value)
    assert "\n" not in message and bad.key in message and repr(bad.value) in message, message


class _NoGrid:
    """A ServerApp grid that fails the test if anything uses it (no round may start)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the invalid config reached the grid ({name})")


@pytest.mark.parametrize("bad", BAD, ids=str)
def test_flwr_run_config_is_refused_before_the_server_app_uses_the_grid(bad: Bad) -> None:
    from server.app import main as server_app_main

    overrides = parse_config_args([f"{bad.key}={bad.toml}"])  # what `flwr run` sends
    assert overrides == {bad.key: bad.value} or math.isnan(overrides[bad.key])
    if bad.key in UNKNOWN:  # the SuperLink refuses a key the app does not declare, naming it
        with pytest.raises(ValueError, match=rf"Key '{bad.key}' is not present"):
            get_fused_config_from_dir(ROOT, overrides)
        return
    run_config = get_fused_config_from_dir(ROOT, overrides)  # what the ServerApp receives
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ConfigError) as err:
        server_app_main(_NoGrid(), context)  # type: ignore[arg-type]
    message = str(err.value)
    assert "\n" not in message and bad.key in message and repr(bad.value) in message, message


@pytest.fixture
def no_flwr_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """``fedmer deploy submit`` may not start ``flwr run`` (nor touch the real $FLWR_HOME)."""
    import subprocess

    def tripwire(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"flwr run was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", tripwire)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))


@pytest.mark.parametrize("bad", BAD, ids=str)
def test_deploy_submit_validates_before_flwr_run(
    bad: Bad, no_flwr_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["deploy", "submit", "--app", str(ROOT), "--connection", "nowhere", "--set", str(bad)]
    rc = cli.main(argv)
    out = capsys.readouterr()
    assert rc == 2, bad.why
    assert "flwr run" not in out.out and out.out == ""  # the command line is printed only when run
    line = _one_clear_line(out.err, bad, "fedmer deploy submit: configuration error: ")
    assert line.endswith("nothing was submitted")


def test_a_valid_submit_passes_the_check_and_reaches_flwr_run(
    no_flwr_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check is no blanket refusal: a good config goes on to ``flwr run`` (here: the tripwire)."""
    argv = [
        "deploy",
        "submit",
        "--app",
        str(ROOT),
        "--connection",
        "nowhere",
        "--set",
        "privacy.target_epsilon=inf",
    ]
    with pytest.raises(AssertionError, match="flwr run was started"):
        cli.main([*argv, "--set", "strategy.name=fedprox", "--set", "data.root=it's"])
    assert "--run-config" in capsys.readouterr().out


def test_the_submit_check_reads_what_flwr_run_sends() -> None:
    """The --run-config text round-trips through Flower's parser, quotes and non-finite floats too."""
    from fedmer.deployment.commands import checked_run_config, run_config_text

    values = {"data.root": "it's here", "privacy.target_epsilon": math.inf, "privacy.budget_cap": 9.5}
    assert parse_config_args([run_config_text(values)]) == values
    exp = checked_run_config(ROOT, values | {"federation.num_rounds": 3})
    assert (exp.data.root, exp.privacy.target_epsilon, exp.federation.num_rounds) == (
        "it's here",
        math.inf,
        3,
    )
    with pytest.raises(ValueError, match=r"data.root=.*both ' and \""):
        run_config_text({"data.root": "a'b\"c"})
