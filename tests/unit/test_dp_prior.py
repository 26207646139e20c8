"""The DP recipe's second version (issue 9): per-clip means (model.encoder=means_linear), a public
starting point (model.prior=face_expressions) and the auto recipe's noise-aware step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.config import ConfigError, ModelConfig
from fedmer.data.ravdess import CLASS_NAMES, FACE_FEATURES
from fedmer.models import build_model
from fedmer.models.multimodal import MultimodalEmotionNet
from fedmer.models.prior import FACE_EXPRESSION_OF_CLASS, apply_prior
from fedmer.privacy.recipe import NOISE_STEP_REF, choose_recipe, momentum_lr_scale, noise_lr_scale

SPEECH = 6
SLICES = ((0, SPEECH), (SPEECH, SPEECH + len(FACE_FEATURES)))
MODALITIES = ("speech", "face")
K = len(CLASS_NAMES)


def _model(prior: str = "none", encoder: str = "means_linear") -> MultimodalEmotionNet:
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=encoder, fusion="sum", prior=prior), SLICES, K, MODALITIES)
    apply_prior(model, prior, modalities=MODALITIES, class_names=CLASS_NAMES, face_features=FACE_FEATURES)
    return model


def _proj(model: MultimodalEmotionNet, m: int) -> torch.nn.Linear:
    proj = model.encoders[m].proj
    assert isinstance(proj, torch.nn.Linear)
    return proj


def test_means_linear_is_one_linear_map_of_the_per_clip_means() -> None:
    model = _model()
    assert sum(p.numel() for p in model.parameters()) == (SPEECH + 1) * K + (len(FACE_FEATURES) + 1) * K
    x = torch.randn(5, 7, SLICES[1][1])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.float32)
    for m, (a, b) in enumerate(SLICES):
        x[mask[:, m] == 0, :, a:b] = 0.0
    expected = sum(
        mask[:, m : m + 1] * _proj(model, m)(x[:, :, a:b].mean(1)) for m, (a, b) in enumerate(SLICES)
    )
    torch.testing.assert_close(model(x, mask), expected)


@settings(max_examples=25, deadline=None)
@given(probs=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=7, max_size=7))
def test_the_prior_model_is_the_face_recogniser(probs: list[float]) -> None:
    """With the prior, each class's logit is the face feature of its name; speech adds nothing."""
    model = _model("face_expressions")
    x = torch.zeros(1, 3, SLICES[1][1])
    x[:, :, :SPEECH] = torch.randn(1, 3, SPEECH)  # speech weights start at 0: no effect
    face = np.zeros(len(FACE_FEATURES), np.float32)
    face[:7] = probs  # anger .. neutral means come first
    x[:, :, SPEECH:] = torch.from_numpy(face)
    logits = model(x, torch.ones(1, 2))[0]
    for k, name in enumerate(CLASS_NAMES):
        assert logits[k].item() == pytest.approx(face[FACE_FEATURES.index(FACE_EXPRESSION_OF_CLASS[name])])


def test_the_prior_works_for_the_functionals_encoder_too_and_reads_the_means() -> None:
    model = _model("face_expressions", encoder="functionals_linear")
    w = _proj(model, 1).weight  # (K, 2 * 56): the means come first
    assert w.abs().sum().item() == K
    assert w[CLASS_NAMES.index("happy"), FACE_FEATURES.index("happiness_mean")].item() == 1.0


def test_the_prior_needs_a_face_and_linear_logit_encoders() -> None:
    with pytest.raises(ConfigError, match="no face"):
        torch.manual_seed(0)
        m = build_model(ModelConfig(encoder="means_linear", fusion="sum"), ((0, 4),), K, ("speech",))
        apply_prior(m, "face_expressions", modalities=("speech",), class_names=CLASS_NAMES)
    with pytest.raises(ConfigError, match="logits"):
        m = build_model(ModelConfig(encoder="functionals", fusion="concat"), SLICES, K, MODALITIES)
        apply_prior(
            m, "face_expressions", modalities=MODALITIES, class_names=CLASS_NAMES, face_features=FACE_FEATURES
        )
    with pytest.raises(ConfigError, match="model.prior"):
        ModelConfig(prior="imagenet")


@settings(max_examples=50, deadline=None)
@given(noise=st.floats(min_value=0.0, max_value=100.0), more=st.floats(min_value=0.0, max_value=10.0))
def test_the_noise_lr_scale_is_one_below_the_reference_and_shrinks_in_proportion_above(
    noise: float, more: float
) -> None:
    s = noise_lr_scale(noise)
    assert 0.0 < s <= 1.0
    assert noise_lr_scale(noise + more) <= s  # more noise never lengthens the step
    if noise <= NOISE_STEP_REF:
        assert s == 1.0
    else:
        assert s * noise == pytest.approx(NOISE_STEP_REF)  # the noise's displacement per step is capped


def test_the_auto_recipe_shortens_the_step_only_where_the_noise_is_large() -> None:
    kw = dict(num_rounds=15, delta=1e-5, accountant="rdp", max_grad_norm=1.0, lr=0.1, batch_size=32)
    quiet = choose_recipe(640, target_epsilon=8.0, **kw)  # type: ignore[arg-type]
    assert quiet.noise_per_step <= NOISE_STEP_REF
    assert quiet.lr == pytest.approx(0.1 * momentum_lr_scale(quiet.steps_per_round))
    loud = choose_recipe(45, target_epsilon=1.0, **kw)  # type: ignore[arg-type]
    assert loud.noise_per_step > NOISE_STEP_REF
    assert loud.lr == pytest.approx(0.1 * momentum_lr_scale(1) * NOISE_STEP_REF / loud.noise_per_step)
