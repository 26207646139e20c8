"""ROC statistics of a membership-inference attack, with the sample sizes that bound them.

An attack hands back one score per candidate (higher = "member"). AUC is computed from
ranks (Mann-Whitney U, ties count one half), so it is exact, invariant under any strictly
monotone rescoring and needs no threshold grid. TPR at a fixed FPR is the low-FPR figure
Carlini et al. (2022) argue matters: an attack that is confident about a few records is a
real leak even at AUC 0.5. It is only reported where the sample can resolve it: at FPR f
with n non-members, fewer than 1/f non-members cannot show a single false positive, so
the value is ``None`` rather than a number that is really "zero false positives allowed".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from scipy.stats import rankdata

__all__ = ["FPRS", "AttackResult", "auc_score", "roc_curve", "roc_metrics", "tpr_at_fpr"]

#: The fixed false-positive rates every attack is reported at.
FPRS: tuple[float, ...] = (0.01, 0.001)
_BOOTSTRAP = 200


def _as_scores(scores: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: an attack needs members and non-members")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds non-finite scores")
    return arr


def auc_score(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counting 1/2."""
    s_in, s_out = _as_scores(scores_in, "scores_in"), _as_scores(scores_out, "scores_out")
    ranks = rankdata(np.concatenate([s_in, s_out]))
    n_in, n_out = len(s_in), len(s_out)
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0
    return float(u / (n_in * n_out))


def tpr_at_fpr(scores_in: np.ndarray, scores_out: np.ndarray, fpr: float) -> float | None:
    """Best TPR of a threshold rule "member iff score > t" whose FPR is at most ``fpr``.

    ``None`` when there are fewer than ``1 / fpr`` non-members (the rate is not resolvable).
    """
    s_in, s_out = _as_scores(scores_in, "scores_in"), _as_scores(scores_out, "scores_out")
    allowed = int(np.floor(fpr * len(s_out) + 1e-9))  # false positives we may make
    if allowed < 1:
        return None
    desc = np.sort(s_out)[::-1]
    if allowed >= len(desc):
        return 1.0
    # Thresholding just above the (allowed+1)-th largest non-member score lets through at
    # most `allowed` non-members (ties with it are excluded too, so never more).
    return float(np.mean(s_in > desc[allowed]))


def roc_metrics(
    scores_in: np.ndarray, scores_out: np.ndarray, fprs: Sequence[float] = FPRS
) -> tuple[float, dict[float, float | None]]:
    """``(AUC, {fpr: TPR at that FPR or None})``."""
    return auc_score(scores_in, scores_out), {f: tpr_at_fpr(scores_in, scores_out, f) for f in fprs}


def roc_curve(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` at every distinct threshold, from (0, 0) to (1, 1)."""
    s_in, s_out = _as_scores(scores_in, "scores_in"), _as_scores(scores_out, "scores_out")
    scores = np.concatenate([s_in, s_out])
    labels = np.concatenate([np.ones(len(s_in)), np.zeros(len(s_out))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # end of each tie block
    tp = np.cumsum(labels)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / len(s_out)], np.r_[0.0, tp / len(s_in)]


def _bootstrap(
    s_in: np.ndarray, s_out: np.ndarray, seed: int, fpr: float
) -> tuple[tuple[float, float], tuple[float, float] | None]:
    """95% percentile intervals of AUC and TPR@fpr, resampling members and non-members apart."""
    rng = np.random.default_rng(seed)
    aucs, tprs = [], []
    for _ in range(_BOOTSTRAP):
        b_in = s_in[rng.integers(0, len(s_in), len(s_in))]
        b_out = s_out[rng.integers(0, len(s_out), len(s_out))]
        aucs.append(auc_score(b_in, b_out))
        tprs.append(tpr_at_fpr(b_in, b_out, fpr))
    lo_hi = (float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5)))
    if tprs[0] is None:
        return lo_hi, None
    # None depends on len(s_out) only, the same in every resample: here no entry is None
    tpr_values = cast(list[float], tprs)
    return lo_hi, (float(np.percentile(tpr_values, 2.5)), float(np.percentile(tpr_values, 97.5)))


@dataclass(frozen=True)
class AttackResult:
    """One attack's scores and ROC summary; ``scores_*`` kept for plotting, not compared."""

    name: str
    auc: float
    auc_ci95: tuple[float, float]
    tpr_at: dict[float, float | None]
    tpr_at_1pct_ci95: tuple[float, float] | None
    n_members: int
    n_nonmembers: int
    scores_in: np.ndarray = field(repr=False, compare=False)
    scores_out: np.ndarray = field(repr=False, compare=False)

    @classmethod
    def from_scores(
        cls, name: str, scores_in: np.ndarray, scores_out: np.ndarray, *, seed: int = 0
    ) -> AttackResult:
        """Summarise member / non-member scores, with bootstrap intervals."""
        s_in, s_out = _as_scores(scores_in, "scores_in"), _as_scores(scores_out, "scores_out")
        auc, tpr_at = roc_metrics(s_in, s_out)
        auc_ci, tpr_ci = _bootstrap(s_in, s_out, seed, FPRS[0])
        return cls(name, auc, auc_ci, tpr_at, tpr_ci, len(s_in), len(s_out), s_in, s_out)

    @property
    def tpr_at_1pct_fpr(self) -> float | None:
        return self.tpr_at[0.01]

    @property
    def tpr_at_01pct_fpr(self) -> float | None:
        return self.tpr_at[0.001]

    def to_json(self) -> dict[str, Any]:
        """The audit.json entry: point estimates, intervals and the counts behind them."""
        unresolved = [f"{f:.1%}" for f, v in self.tpr_at.items() if v is None]
        note = (
            f"{self.n_members} members vs {self.n_nonmembers} non-members; 95% intervals from "
            f"{_BOOTSTRAP} stratified bootstrap resamples"
        )
        if unresolved:
            note += (
                f"; TPR at {', '.join(unresolved)} FPR not reported: fewer than 1/FPR non-members "
                "cannot show a single false positive"
            )
        return {
            "auc": self.auc,
            "auc_ci95": list(self.auc_ci95),
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "tpr_at_1pct_fpr_ci95": list(self.tpr_at_1pct_ci95) if self.tpr_at_1pct_ci95 else None,
            "tpr_at_0.1pct_fpr": self.tpr_at_01pct_fpr,
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "note": note,
        }
