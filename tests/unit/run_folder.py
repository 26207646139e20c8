"""A small finished run folder for the post-hoc tools, without starting a Flower simulation.

Same files as a real run (config.json with the privacy statement, model.pt of a plain
state dict, summary.json, one ledger per client holding the DP-SGD entries its rounds
would have recorded); the model is trained centrally with the run's client recipe
(fedmer.posthoc.audit.attacks.train_like_run) so it is better than chance. The e2e tests use a
real simulation instead.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from fedmer.config import DataConfig, ExperimentConfig, FederationConfig, ModelConfig, PrivacyConfig
from fedmer.data.base import concat_datasets
from fedmer.data.registry import load_client_dataset, load_split
from fedmer.posthoc.audit.attacks import train_like_run
from fedmer.privacy.engine import noise_for_target, planned_steps
from fedmer.privacy.ledger import load_ledger
from fedmer.privacy.statement import privacy_statement

TINY = ExperimentConfig(
    data=DataConfig(persons_per_site=3, test_persons_per_site=2, sequences_per_person=24, seq_len=8),
    model=ModelConfig(hidden=16),
    privacy=PrivacyConfig(mode="sample", target_epsilon=4.0),
    federation=FederationConfig(num_clients=2, num_rounds=2, local_epochs=1, batch_size=16, lr=0.1),
)


def make_run_folder(root: Path, cfg: ExperimentConfig = TINY, *, ledgers: bool = True) -> Path:
    """Write a run folder under ``root``; each client's ledger gets ``num_rounds`` round entries."""
    run = root / "run"
    run.mkdir(parents=True)
    config = {
        "run_config": replace(cfg, output_dir=str(run)).to_run_config(),
        "privacy": privacy_statement(cfg),
    }
    (run / "config.json").write_text(json.dumps(config))
    pool = load_client_dataset(cfg, 0)
    for c in range(1, cfg.federation.num_clients):
        pool = concat_datasets([pool, load_client_dataset(cfg, c)])
    plain = replace(cfg, privacy=PrivacyConfig(mode="off"))
    model = train_like_run(plain, pool, seed=0, noise=0.0, steps=60)
    torch.save(model.state_dict(), run / "model.pt")
    p, f = cfg.privacy, cfg.federation
    if ledgers and p.sample_level:
        for c in range(f.num_clients):
            n = len(load_client_dataset(cfg, c))
            rate, total = planned_steps(n, f.batch_size, f.local_epochs, f.num_rounds)
            noise = noise_for_target(p.target_epsilon, p.delta, rate, total, p.accountant)
            ledger = load_ledger(
                run / "ledgers" / f"client-{c}.json",
                node=f"client-{c}",
                accountant=p.accountant,
                delta=p.delta,
                cap=p.budget_cap,
            )
            for rnd in range(1, f.num_rounds + 1):
                ledger = ledger.record([(noise, rate, total // f.num_rounds)], run_id="42", server_round=rnd)
    final = {
        "epsilon_max": p.target_epsilon,
        "delta": p.delta,
        "accountant": p.accountant,
        "privacy_unit": "sample",
    }
    (run / "summary.json").write_text(json.dumps({"final": final}))
    assert len(load_split(cfg).test) > 0
    return run
