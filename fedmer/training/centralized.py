"""The centralised reference of a federated experiment: same model, pooled data, no DP.

A federated result means little without the number the same network reaches when all the
clients' training data sit in one place and no noise is added. :func:`train_centralized`
trains exactly the configured model (``build_model_for``) on the union of every client's
partition (``load_client_dataset`` for each client, so it is the data the federation
trains on, not a re-split), with the clients' optimiser (SGD, momentum 0.9,
``federation.lr``, ``federation.batch_size``), and scores it on the same held-out test
persons (``load_split(cfg).test``) as the server does. The default budget is
``num_rounds x local_epochs`` epochs: every training sample contributes as many gradients
as it does in the federated run.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from fedmer.config import ConfigError, ExperimentConfig
from fedmer.data.base import MultimodalDataset, concat_datasets
from fedmer.data.feature_stats import exact_feature_stats
from fedmer.data.registry import load_client_dataset, load_split
from fedmer.models import build_model_for
from fedmer.training.loops import evaluate_model, make_loader, seed_everything, train_epochs

__all__ = ["default_epochs", "pooled_training_data", "train_centralized"]

log = logging.getLogger(__name__)


def pooled_training_data(cfg: ExperimentConfig) -> MultimodalDataset:
    """Every client's training partition, pooled (what a central server would hold)."""
    return concat_datasets([load_client_dataset(cfg, i) for i in range(cfg.federation.num_clients)])


def default_epochs(cfg: ExperimentConfig) -> int:
    """``num_rounds x local_epochs``: each sample gives as many gradients as in the federated run."""
    return cfg.federation.num_rounds * cfg.federation.local_epochs


def train_centralized(
    cfg: ExperimentConfig, epochs: int | None = None, eval_every: int | None = None
) -> dict:
    """Train the configured model centrally without DP; return held-out metrics and the curve.

    ``epochs`` defaults to :func:`default_epochs`; the held-out test set is scored every
    ``eval_every`` epochs (default ``local_epochs``, i.e. once per federated-round
    equivalent) and at the end. The result holds the final epoch's ``uar``, ``macro_f1``,
    ``accuracy``, ``loss`` and ``per_class_recall`` (the figures to compare with a federated
    run's final round), ``best_uar`` over the curve (optimistic: chosen on the test set),
    ``curve`` (epoch, test UAR, train loss), the sample counts and ``wall_s``. When some test
    samples lack a modality, ``complete_uar`` is the final UAR on those that have every one.
    """
    epochs = default_epochs(cfg) if epochs is None else epochs
    eval_every = cfg.federation.local_epochs if eval_every is None else eval_every
    for name, value in (("epochs", epochs), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"invalid {name}={value!r}: expected a positive integer")
    start = time.perf_counter()
    train, test = pooled_training_data(cfg), load_split(cfg).test
    seed = seed_everything(cfg.seed, 0, -1 % 2**31)  # not any client's (seed, round, pid) stream
    model = build_model_for(cfg, train)
    if model.standardizer is not None:  # a central server holds the data: exact pooled statistics
        model.set_feature_stats(exact_feature_stats(train))
    f = cfg.federation
    optimizer = torch.optim.SGD(model.parameters(), lr=f.lr, momentum=0.9)
    loader = make_loader(train, f.batch_size, seed)
    curve: list[dict] = []
    done, loss = 0, math.nan
    while done < epochs:
        step = min(eval_every, epochs - done)
        loss = train_epochs(model, loader, optimizer, step).loss
        done += step
        report = evaluate_model(model, test)
        curve.append({"epoch": done, "uar": report["uar"], "train_loss": loss})
        log.info(
            "centralised epoch %d/%d: train loss %.4f, held-out UAR %.4f", done, epochs, loss, report["uar"]
        )
    complete = np.flatnonzero(test.mask.all(axis=1))
    complete_uar = (
        evaluate_model(model, test.subset(complete))["uar"] if 0 < len(complete) < len(test) else None
    )
    return {
        "uar": report["uar"],
        "complete_uar": complete_uar,
        "complete_test_samples": len(complete),
        "macro_f1": report["macro_f1"],
        "accuracy": report["accuracy"],
        "loss": report["loss"],
        "per_class_recall": [float(r) for r in report["per_class_recall"]],
        "best_uar": max(point["uar"] for point in curve),
        "curve": curve,
        "epochs": epochs,
        "train_samples": len(train),
        "test_samples": len(test),
        "train_persons": len(np.unique(train.person)),
        "test_persons": len(np.unique(test.person)),
        "chance_uar": 1.0 / test.num_classes,
        "wall_s": time.perf_counter() - start,
    }
