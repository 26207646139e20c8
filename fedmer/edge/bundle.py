"""A model file that stands on its own: weights plus everything inference needs, no data.

``model.pt`` is a bare state dict: to use it one must rebuild the run's dataset to learn the
input layout and the class count. A bundle (``model_bundle.pt``, written beside ``model.pt``
at the end of every run) carries the same weights together with:

* the input layout: modalities, their feature columns (``feature_slices``), ``seq_len``;
* the model config (``model.*``) and whether it standardises its input (the standardiser's
  ``shift``/``scale`` buffers are in the state dict, so the scaling travels with it);
* per modality, the feature front-end and its settings (RAVDESS speech: the
  :class:`~fedmer.data.audio_features.AudioFrontEnd` parameters; face: the 56 CSV columns);
* class and intensity names;
* the privacy statement of the run that made it and its final epsilon.

The file is ``torch.save`` of plain dicts, strings and tensors (``weights_only=True``
loads it); the metadata is a JSON string, readable without FedMER. ``model.pt`` stays
as it was, so every existing reader keeps working.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedmer.config import ConfigError, ExperimentConfig, ModelConfig
from fedmer.data.base import MultimodalDataset
from fedmer.models.multimodal import MultimodalEmotionNet, build_model
from fedmer.privacy.statement import privacy_statement

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "BundleError",
    "BundleMeta",
    "ModelBundle",
    "bundle_meta",
    "frontend_settings",
    "load_bundle",
    "open_bundle",
    "save_bundle",
    "write_run_bundle",
]

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "fedmer.model-bundle"
BUNDLE_VERSION = 1


class BundleError(ValueError):
    """The file is not a FedMER model bundle, or its weights do not fit its own metadata."""


def _json_safe(value: Any) -> Any:
    """JSON has no infinity: 'inf' / '-inf' strings, NaN as None (as the run files do)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class BundleMeta:
    """What a model needs at inference time, apart from its weights."""

    modalities: tuple[str, ...]
    feature_slices: tuple[tuple[int, int], ...]
    seq_len: int
    class_names: tuple[str, ...]
    model: dict[str, Any]  # ModelConfig fields
    standardize: bool  # the model's first layer is an InputStandardizer (buffers in the state dict)
    frontends: dict[str, dict[str, Any]]  # per modality: how its features are computed
    data: dict[str, Any]  # data.* of the run (provenance; loading never reads data.root)
    privacy: dict[str, Any]  # statement of the run + final epsilon, when known
    intensity_names: tuple[str, ...] = ()

    @property
    def num_features(self) -> int:
        return max(b for _, b in self.feature_slices)

    @property
    def feature_dims(self) -> dict[str, int]:
        return {m: b - a for m, (a, b) in zip(self.modalities, self.feature_slices, strict=True)}

    def to_json(self) -> dict[str, Any]:
        out = _json_safe(asdict(self))
        out["feature_dims"] = self.feature_dims
        out["num_features"] = self.num_features
        return dict(out)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> BundleMeta:
        try:
            return cls(
                modalities=tuple(raw["modalities"]),
                feature_slices=tuple((int(a), int(b)) for a, b in raw["feature_slices"]),
                seq_len=int(raw["seq_len"]),
                class_names=tuple(raw["class_names"]),
                model=dict(raw["model"]),
                standardize=bool(raw["standardize"]),
                frontends={k: dict(v) for k, v in raw["frontends"].items()},
                data=dict(raw["data"]),
                privacy=dict(raw["privacy"]),
                intensity_names=tuple(raw.get("intensity_names", ())),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"bundle metadata is incomplete or malformed ({err!r})") from None


@dataclass(frozen=True)
class ModelBundle:
    """A loaded bundle: the plain model (eval mode) and its metadata."""

    model: MultimodalEmotionNet
    meta: BundleMeta


def frontend_settings(cfg: ExperimentConfig, modalities: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per modality, the front-end that turns a recording into the model's feature columns."""
    from fedmer.data.audio_features import build_audio_frontend
    from fedmer.data.ravdess import face_columns

    out: dict[str, dict[str, Any]] = {}
    for m in modalities:
        if cfg.data.name == "ravdess" and m == "speech":
            fe = build_audio_frontend(cfg.data.audio_frontend, cfg.data.seq_len, cfg.data.audio_level_norm)
            out[m] = {"type": "audio", **fe.params(), "feature_names": list(fe.feature_names)}
        elif cfg.data.name == "ravdess" and m == "face":
            out[m] = {
                "type": "face_csv",
                "columns": list(face_columns(cfg.data.face_features)),  # data.face_features
                "scaling": "mouth_openness_* / 100; others as given; constant over frames",
                "transform": cfg.data.face_transform,  # data.face_transform (logodds: log((q+.01)/(1.01-q)))
            }
        elif m == "text":
            out[m] = {"type": "text", "encoder": cfg.data.text_encoder}
        else:  # synthetic / Stress-Predict windows: the dataset's own loader computes them
            out[m] = {"type": "dataset", "dataset": cfg.data.name}
    return out


def bundle_meta(
    cfg: ExperimentConfig, data: MultimodalDataset, final: Mapping[str, Any] | None = None
) -> BundleMeta:
    """The metadata of a model trained by ``cfg`` on data laid out like ``data``."""
    achieved = {k: (final or {}).get(k) for k in ("epsilon_max", "delta", "accountant", "privacy_unit")}
    return BundleMeta(
        modalities=tuple(data.modalities),
        feature_slices=tuple(data.feature_slices),
        seq_len=data.seq_len,
        class_names=tuple(data.class_names),
        model=asdict(cfg.model),
        standardize=cfg.data.standardize != "none",
        frontends=frontend_settings(cfg, data.modalities),
        data=asdict(cfg.data),
        privacy={"statement": privacy_statement(cfg), "final": achieved},
        intensity_names=tuple(data.intensity_names) if cfg.model.intensity_weight > 0 else (),
    )


def _build(meta: BundleMeta) -> MultimodalEmotionNet:
    try:
        model_cfg = ModelConfig(**meta.model)
        return build_model(
            model_cfg,
            meta.feature_slices,
            len(meta.class_names),
            meta.modalities,
            intensity_classes=len(meta.intensity_names),
            standardize=meta.standardize,
        )
    except (ConfigError, TypeError, ValueError) as err:
        raise BundleError(f"bundle metadata does not describe a buildable model: {err}") from None


def save_bundle(path: str | Path, state_dict: Mapping[str, torch.Tensor], meta: BundleMeta) -> Path:
    """Write weights + metadata to ``path``, after checking the weights fit the metadata."""
    model = _build(meta)
    try:
        model.load_state_dict(dict(state_dict))
    except RuntimeError as err:
        raise BundleError(f"the weights do not fit the bundle's model: {err}") from None
    blob = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "meta": json.dumps(meta.to_json()),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def load_bundle(path: str | Path) -> ModelBundle:
    """The bundle at ``path`` as a plain model in eval mode; needs no dataset."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"no model bundle at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise BundleError(f"{path} is not a FedMER model bundle ({err})") from None
    if not isinstance(blob, dict) or blob.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a FedMER model bundle (a bare state dict? use the run's bundle)")
    if blob.get("version") != BUNDLE_VERSION:
        version = blob.get("version")
        raise BundleError(f"{path} is bundle version {version}; this FedMER reads {BUNDLE_VERSION}")
    try:
        meta = BundleMeta.from_json(json.loads(blob["meta"]))
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: unreadable bundle metadata ({err!r})") from None
    model = _build(meta)
    try:
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise BundleError(f"{path}: weights do not fit the bundle's own metadata: {err}") from None
    model.eval()
    return ModelBundle(model, meta)


def open_bundle(path: str | Path) -> ModelBundle:
    """A bundle file, or a run folder's bundle; a run from before bundles gets a clear error."""
    from fedmer.results.layout import BUNDLE, CHECKPOINT

    path = Path(path)
    if path.is_dir():
        if not (path / BUNDLE).is_file():
            why = (
                f"only a bare {CHECKPOINT} (written before bundles)"
                if (path / CHECKPOINT).is_file()
                else "none"
            )
            raise BundleError(f"{path} holds no {BUNDLE} ({why}): re-run it, or pass a bundle file")
        path = path / BUNDLE
    return load_bundle(path)


def write_run_bundle(
    path: Path, cfg: ExperimentConfig, state_dict: Mapping[str, torch.Tensor], final: Mapping[str, Any]
) -> Path | None:
    """End of a run: write its bundle; never fails the run (a warning says why it was skipped).

    The layout is read from the run's held-out set, which the ServerApp has already loaded in
    this process (``load_test_set`` is cached), so this costs no data loading there (and never
    builds the training pool: at 10,000 clients that cost 15 s and 1.8 GB at the end of a run).
    A state dict that is not a FedMER network (a stand-in in tests) is skipped without loading
    anything.
    """
    from fedmer.data.registry import load_test_set

    if not any(k.startswith("encoders.") for k in state_dict):
        log.debug("state dict is not a FedMER network: no model bundle written")
        return None
    try:
        test = load_test_set(cfg)
        return save_bundle(path, state_dict, bundle_meta(cfg, test, final))
    except (BundleError, ConfigError, OSError, ValueError) as err:
        log.warning("no model bundle written to %s: %s", path, err)
        return None
