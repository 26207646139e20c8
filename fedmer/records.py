"""Names of the records and keys exchanged between ServerApp and ClientApp.

Both sides import these constants, so a renamed key is a compile-time change in one
place rather than a silent mismatch between two string literals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

__all__ = [
    "ARRAYS",
    "CLIENT_WEIGHT",
    "CONFIG",
    "DELTA",
    "EPSILON",
    "EPSILON_LIFETIME",
    "EVALUATE_REPLY_METRICS",
    "EVAL_ACCURACY",
    "EVAL_LOSS",
    "LEDGER_RUN",
    "LOCAL_EPOCHS",
    "LR",
    "METRICS",
    "MODALITY_COUNT_PREFIX",
    "NOISE_MULTIPLIER",
    "NUM_EXAMPLES",
    "PARTITION_ID",
    "PRIVACY_STATE",
    "PROXIMAL_MU",
    "QUERY",
    "QUERY_FEATURE_STATS",
    "SERVER_ROUND",
    "STATS",
    "STATS_CLIP_NORM",
    "STATS_COUNT",
    "STATS_NOISE_MULTIPLIER",
    "STATS_SUMS",
    "STEPS",
    "TRAIN_LOSS",
    "TRAIN_REPLY_METRICS",
    "TRAIN_REPLY_METRICS_MINIMAL",
    "UPDATE_CLIPPED",
    "UPDATE_NORM",
    "WANT_MODALITY_COUNTS",
    "modality_count_key",
    "scalar",
]

# RecordDict keys (Flower strategies use "arrays" / "config" by default)
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PRIVACY_STATE = "fedmer.privacy"  # ConfigRecord in Context.state: the accountant history

# MetricRecord keys sent by clients
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
EPSILON = "epsilon"  # this run, cumulative over the rounds the node joined
EPSILON_LIFETIME = "epsilon_lifetime"  # the node ledger: every run, every round
DELTA = "delta"
NOISE_MULTIPLIER = "noise_multiplier"
STEPS = "dp_steps"
UPDATE_NORM = "update_norm"
UPDATE_CLIPPED = "update_clipped"
PARTITION_ID = "partition_id"
CLIENT_WEIGHT = "client-weight"  # always 1: the equal weights client-level DP accounting needs

#: What a TRAIN reply's MetricRecord holds under ``privacy.reply_metrics=minimal`` (the default
#: under DP): the privacy statement and the partition id, no exact statistic of the node's data
#: (README "What leaves a node"; a test pins it).
TRAIN_REPLY_METRICS_MINIMAL = frozenset(
    {CLIENT_WEIGHT, EPSILON, EPSILON_LIFETIME, DELTA, NOISE_MULTIPLIER, STEPS, PARTITION_ID}
)
#: Everything a TRAIN reply's MetricRecord holds with ``reply_metrics=monitoring`` (the default
#: without DP): also the exact sample count, mean training loss and pre-clipping update norm.
#: None of it is noised or accounted; it is declared.
TRAIN_REPLY_METRICS = TRAIN_REPLY_METRICS_MINIMAL | {NUM_EXAMPLES, TRAIN_LOSS, UPDATE_NORM, UPDATE_CLIPPED}
#: Train-config flag of ``strategy=fedavg_modality``: reply with a sample count per modality.
WANT_MODALITY_COUNTS = "fedmer.want-modality-counts"
MODALITY_COUNT_PREFIX = "modality-count-"


def modality_count_key(index: int) -> str:
    """The reply metric holding a node's number of samples with modality ``index``."""
    return f"{MODALITY_COUNT_PREFIX}{index}"


#: Everything an EVALUATE reply holds (only sent when federation.fraction_evaluate > 0).
EVALUATE_REPLY_METRICS = frozenset({NUM_EXAMPLES, CLIENT_WEIGHT, EVAL_LOSS, EVAL_ACCURACY, PARTITION_ID})

# ConfigRecord keys sent by the server
SERVER_ROUND = "server-round"  # injected by every Flower strategy
PROXIMAL_MU = "proximal-mu"  # injected by Flower's FedProx
LR = "lr"
LOCAL_EPOCHS = "local-epochs"
LEDGER_RUN = "fedmer.ledger-run"  # the run a node's ledger charges (a resumed run's original run id)

# Feature-statistics query (data.standardize=federated), sent before round 1
QUERY = "fedmer.query"  # ConfigRecord key naming what a QUERY message asks for
QUERY_FEATURE_STATS = "feature-stats"
STATS = "fedmer.stats"  # ArrayRecord with the released sums
STATS_SUMS = ("sum_mean", "sum_mean_sq", "sum_std", "sum_std_sq")  # the StatsRelease field names
STATS_COUNT = "count"
STATS_CLIP_NORM = "stats_clip_norm"
STATS_NOISE_MULTIPLIER = "stats_noise_multiplier"


def scalar(record: Mapping[str, object], key: str, default: float | None = None) -> float:
    """``record[key]`` (``record.get(key, default)`` when a default is given), typed as a number.

    Flower types a record's values as a union of numbers, strings, lists and arrays; the keys
    above that hold one number say so here. Nothing is converted: an int comes back an int.
    """
    return cast(float, record[key] if default is None else record.get(key, default))
