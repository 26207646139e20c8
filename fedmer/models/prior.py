"""``model.prior``: start a logit-level model from public knowledge instead of from noise.

``face_expressions``: RAVDESS' face features include the per-clip mean probability of seven
facial expressions (anger, disgust, fear, happiness, sadness, surprise, neutral), the output of
an expression recogniser trained on other people's faces. Their names are RAVDESS' emotion
names, so a linear face encoder can start as that recogniser: the logit of each RAVDESS class
is the face feature of the same name (``calm`` takes ``neutral``, which RAVDESS' calm
performances resemble most); every other weight and bias of the model starts at 0.

With ``data.face_transform=logodds`` the starting logits are the log-odds of the recogniser's
probabilities, so the starting model predicts the expression it saw. It reads no sample of
anyone's data: the map comes from the feature and class *names*, which are public, so it costs
no privacy. DP-SGD then only has to learn corrections (calm against neutral, the speech
weights), which is what survives its noise on small clients (README, "DP that learns"; a
pretrained starting point is the DP literature's first advice, Ponomareva et al. 2023).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedmer.config import MODEL_PRIORS, ConfigError

__all__ = ["FACE_EXPRESSION_OF_CLASS", "PRIORS", "apply_prior"]

#: RAVDESS class -> the face feature of the same expression (per-clip mean probability).
FACE_EXPRESSION_OF_CLASS: dict[str, str] = {
    "neutral": "neutral_mean",
    "calm": "neutral_mean",
    "happy": "happiness_mean",
    "sad": "sadness_mean",
    "angry": "anger_mean",
    "fearful": "fear_mean",
    "disgust": "disgust_mean",
    "surprised": "surprise_mean",
}
PRIORS = MODEL_PRIORS


def _linear_of(encoder: nn.Module) -> nn.Linear:
    proj = getattr(encoder, "proj", None)
    if not isinstance(proj, nn.Linear):
        raise ConfigError(
            f"invalid model.prior=face_expressions with encoder {type(encoder).__name__}: the prior "
            "sets a linear encoder's weights; use model.encoder=means_linear or functionals_linear"
        )
    return proj


def apply_prior(
    model: nn.Module,
    prior: str,
    *,
    modalities: Sequence[str],
    class_names: Sequence[str],
    face_features: Sequence[str] = (),
) -> None:
    """Set ``model``'s starting weights from ``prior`` in place (``none``: leave them as drawn)."""
    if prior == "none":
        return
    if prior not in PRIORS:
        raise ConfigError(f"invalid model.prior={prior!r}: expected one of {', '.join(PRIORS)}")
    if "face" not in modalities:
        raise ConfigError(
            "invalid model.prior=face_expressions: the model reads no face features "
            f"(modalities {', '.join(modalities)}); add face to data.modalities or set model.prior=none"
        )
    missing = [c for c in class_names if c not in FACE_EXPRESSION_OF_CLASS]
    if missing:
        raise ConfigError(
            f"invalid model.prior=face_expressions: no face expression for the classes {missing} "
            "(the prior knows RAVDESS' eight emotions)"
        )
    encoders = getattr(model, "encoders", None)
    if not isinstance(encoders, nn.ModuleList) or not getattr(model.fusion, "embeds_logits", False):
        raise ConfigError(
            "invalid model.prior=face_expressions: the prior needs encoders whose outputs are logits "
            "(model.fusion=sum, e.g. model=linear)"
        )
    linears = [_linear_of(e) for e in encoders]
    face = linears[list(modalities).index("face")]
    with torch.no_grad():
        for lin in linears:
            lin.weight.zero_()
            lin.bias.zero_()
        for k, name in enumerate(class_names):
            face.weight[k, list(face_features).index(FACE_EXPRESSION_OF_CLASS[name])] = 1.0
