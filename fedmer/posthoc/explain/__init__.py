"""Per-prediction modality contributions of a run's global model (``fedmer explain``)."""

from fedmer.posthoc.explain.attribution import Explanation, ModalityContribution, explain, mean_contributions
from fedmer.posthoc.explain.report import explain_run, format_explanations

__all__ = [
    "Explanation",
    "ModalityContribution",
    "explain",
    "explain_run",
    "format_explanations",
    "mean_contributions",
]
