"""Synthetic multimodal emotion data: persons, sites, missing sensors and dynamics.

Real in-vehicle and clinical emotion corpora cannot be shipped, so FedMER generates
data with the properties that make federated multimodal recognition hard:

* Emotions are points in a latent (valence, arousal, control) space. Each modality sees
  a different, partial projection of it (speech: arousal plus a little control, face:
  valence, physiology: arousal, CAN telemetry: driving style = control), so some class
  pairs are told apart only by combining modalities.
* Persons differ (feature baselines, expressivity, idiosyncratic class centres), sites
  differ (sensor gain, offset and noise, half-rate sample-and-hold sensors) and each
  site has its own sensor kit: a car without a cabin camera has no face at all.
* Emotions unfold over a sequence (random onset and ramp, slow latent drift, lagged
  physiology, speech pauses), so a frame-wise or first-frame view is not enough.

Layout: both scenarios keep the full 4-modality layout of ``config.MODALITIES``; in
``clinic`` the ``can`` columns are always zero and its mask False, so model code is
uniform. Modalities outside ``DataConfig.modality_list`` are masked the same way (the
random draws do not depend on it, so restricting modalities changes nothing else); a
site with none of the selected sensors then yields samples whose mask is all False.
Features are standardised with statistics of the present training samples only.

Each sample also carries an intensity label, like RAVDESS' normal/strong: the expressivity
factor that already scales its latent trajectory (uniform on [0.6, 1.3]) cut at its
midpoint, so the label costs no extra random draw and changes no feature value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from fedmer.config import MODALITIES, ConfigError, DataConfig
from fedmer.data.base import DatasetSplit, MultimodalDataset

__all__ = ["INTENSITY_NAMES", "generate_synthetic", "scenario_class_names"]

_log = logging.getLogger(__name__)

#: Intensity levels of every synthetic sample (``MultimodalDataset.intensity_names``).
INTENSITY_NAMES: tuple[str, ...] = ("normal", "strong")
_STRENGTH_RANGE = (0.6, 1.3)  # expressivity factor of a sample's latent trajectory

# Generative knobs, tuned with bench/synthetic_separability.py (see its docstring).
_PERSON_CENTER_SD = 0.15  # idiosyncratic shift of each person's class centres (latent units)
_PERSON_BASELINE_SD = 0.3  # per-feature resting baseline of each person
_PERSON_GAIN_SD = 0.35  # log-sd of a person's expressivity per modality
_LATENT_DRIFT_SD = 0.2  # slow AR(1) wandering of the latent state within a sequence
_SITE_GAIN_SD = 0.2  # log-sd of per-feature sensor gain at a site
_SITE_OFFSET_SD = 0.3
_HALF_RATE_P = 0.3  # chance that a site's non-speech sensor updates at half rate
#: Per-frame sensor noise sd of each modality (before the site's own noise level).
_NOISE = MappingProxyType({"speech": 0.6, "face": 0.45, "physio": 0.28, "can": 0.36})


@dataclass(frozen=True)
class _Scenario:
    """Class geometry, modality loadings and sensor availability of one scenario."""

    classes: tuple[str, ...]
    centers: np.ndarray  # (C, 3) latent (valence, arousal, control) per class
    loadings: dict[str, np.ndarray]  # modality -> (3, F) latent-to-feature map
    availability: tuple[float, ...]  # per MODALITIES entry: P(a site has this sensor)


def _speech_loadings(w_val: float, w_aro: float, w_ctl: float) -> np.ndarray:
    """16 log-mel bands: arousal lifts energy and high-band tilt, control the low bands."""
    k = np.linspace(0.0, 1.0, 16)
    aro = w_aro * (0.4 + 0.8 * k)
    ctl = w_ctl * (1.0 - k)
    val = w_val * np.exp(-(((k - 0.55) / 0.15) ** 2))  # a smile shifts mid formants
    return np.stack([val, aro, ctl])


def _scenario(name: str) -> _Scenario:
    """The fixed "physics" of a scenario; built per call so nothing mutable is module-level."""
    if name == "driving":
        classes = ("neutral", "happy", "angry", "stressed", "fatigued")
        centers = [[0, 0, 0], [1, 0.5, 0], [-1, 1, 1], [-1, 1, -1], [-0.3, -1, -0.2]]
        # AU1 AU2 AU4 AU6 AU7 AU9 AU12 AU15 AU20 AU43 (valence / arousal / control rows)
        face = [
            [-0.3, 0.0, -0.8, 0.8, -0.3, -0.2, 1.0, -0.7, -0.2, 0.0],
            [0.1, 0.15, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.25],
            [0.0, 0.0, 0.15, 0.0, 0.1, 0.0, 0.0, 0.0, -0.15, 0.0],
        ]
        physio = [[0.0, 0.0], [0.9, 0.8], [0.1, -0.35]]  # heart rate, EDA
        can = [[0.0, 0.0, 0.0, -0.1], [0.2, -0.1, 0.0, 0.2], [0.7, 0.0, 0.6, 0.5]]
        availability = (0.95, 0.7, 0.6, 0.9)
        speech = _speech_loadings(0.1, 0.5, 0.25)
    elif name == "clinic":
        classes = ("neutral", "happy", "sad", "anxious", "pain")
        # control axis: +1 somatic distress (pain), -1 worry without a bodily cause (anxiety)
        centers = [[0, 0, 0], [1, 0.5, 0], [-1, -0.8, 0], [-0.8, 0.8, -1], [-0.8, 0.8, 1]]
        face = [
            [-0.3, 0.0, -0.7, 0.8, -0.2, -0.2, 1.0, -0.7, -0.1, 0.0],
            [0.03, 0.045, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.06],
            [-0.05, 0.0, 0.06, 0.04, 0.075, 0.06, 0.0, 0.0, -0.05, 0.025],
        ]
        physio = [[0.0, 0.0, 0.0], [0.8, 0.8, -0.1], [0.1, -0.15, 0.3]]  # HR, EDA, skin temp
        can = [[0.0] * 4] * 3
        availability = (0.9, 0.7, 0.75, 0.0)
        speech = _speech_loadings(0.1, 0.5, 0.2)
    else:
        raise ConfigError(f"invalid data.scenario={name!r}: expected driving or clinic")
    loadings = {"speech": speech, "face": np.asarray(face), "physio": np.asarray(physio)}
    loadings["can"] = np.asarray(can)
    return _Scenario(tuple(classes), np.asarray(centers, dtype=np.float64), loadings, availability)


def scenario_class_names(scenario: str) -> tuple[str, ...]:
    """Class names of a synthetic scenario, in label-index order."""
    return _scenario(scenario).classes


def _site_availability(spec: _Scenario, num_sites: int, rng: np.random.Generator) -> np.ndarray:
    """(S, M) sensor kits; every site keeps speech or at least two modalities."""
    probs = np.asarray(spec.availability)
    kits = np.zeros((num_sites, len(MODALITIES)), dtype=bool)
    for s in range(num_sites):
        for _ in range(100):
            kit = rng.random(len(MODALITIES)) < probs
            if kit[0] or kit.sum() >= 2:
                break
        else:  # unreachable for the built-in scenarios; keep the best-equipped kit
            kit = probs > 0
        kits[s] = kit
    return kits


def _lowpass(x: np.ndarray, beta: float) -> np.ndarray:
    """First-order lag along time (axis 1): physiology and vehicle speed respond slowly."""
    out = np.empty_like(x)
    out[:, 0] = x[:, 0]
    for t in range(1, x.shape[1]):
        out[:, t] = out[:, t - 1] + beta * (x[:, t] - out[:, t - 1])
    return out


def _latent(
    centers: np.ndarray,
    y: np.ndarray,
    person: np.ndarray,
    n_persons: int,
    seq_len: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, T, 3) latent state: person-specific class centre x onset ramp + AR(1) drift.

    Also returns each sample's (N,) expressivity factor, the source of its intensity label.
    """
    n = len(y)
    jitter = rng.normal(0.0, _PERSON_CENTER_SD, size=(n_persons, len(centers), 3))
    target = centers[y] + jitter[person, y]
    intensity = rng.uniform(*_STRENGTH_RANGE, size=n)
    onset = rng.uniform(0.1, 0.5, size=n) * seq_len
    width = rng.uniform(0.7, 2.5, size=n)
    t = np.arange(seq_len)[None, :]
    ramp = 1.0 / (1.0 + np.exp(-(t - onset[:, None]) / width[:, None]))
    phi = 0.8
    shocks = rng.normal(0.0, _LATENT_DRIFT_SD * np.sqrt(1 - phi**2), size=(n, seq_len, 3))
    drift = np.empty_like(shocks)
    drift[:, 0] = rng.normal(0.0, _LATENT_DRIFT_SD, size=(n, 3))
    for k in range(1, seq_len):
        drift[:, k] = phi * drift[:, k - 1] + shocks[:, k]
    return target[:, None, :] * (intensity[:, None] * ramp)[:, :, None] + drift, intensity


def _modality_signal(name: str, latent: np.ndarray, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise-free emotional signal of one modality, with its own temporal behaviour."""
    sig = latent @ w
    if name == "speech":  # pauses carry no prosody; fatigue means more pauses
        p_voiced = np.clip(0.8 + 0.12 * latent[..., 1], 0.4, 0.97)
        voiced = rng.random(p_voiced.shape) < p_voiced
        sig = np.where(voiced[..., None], sig, -1.0)
    elif name == "physio":
        sig = _lowpass(sig, 0.35)
    elif name == "can":  # speed lags, acceleration follows it, steering jitters when tired
        sig[..., 0] = _lowpass(sig[..., 0], 0.4)
        sig[..., 2] += np.diff(sig[..., 0], axis=1, prepend=sig[:, :1, 0])
        amp = 0.3 + 0.5 * np.maximum(-latent[..., 1], 0.0) + 0.3 * np.maximum(latent[..., 2], 0.0)
        sig[..., 1] += amp * rng.normal(size=amp.shape)
    return sig


def generate_synthetic(cfg: DataConfig, num_sites: int, seed: int) -> DatasetSplit:
    """Training persons and held-out test persons of every site, deterministic in ``seed``."""
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise ConfigError(f"invalid num_sites={num_sites!r}: expected a positive integer")
    spec = _scenario(cfg.scenario)
    used = np.array(
        [m in cfg.modality_list and p > 0 for m, p in zip(MODALITIES, spec.availability, strict=True)]
    )
    if not used.any():
        raise ConfigError(
            f"invalid data.modalities={cfg.modalities!r}: none of them exists in the "
            f"{cfg.scenario} scenario; choose from "
            + ", ".join(m for m, p in zip(MODALITIES, spec.availability, strict=True) if p > 0)
        )
    rng_site, rng_person, rng_seq, rng_sensor = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    kits = _site_availability(spec, num_sites, rng_site)
    half_rate = rng_site.random(kits.shape) < _HALF_RATE_P
    half_rate[:, 0] = False  # microphones always run at the full frame rate
    noise_level = rng_site.uniform(0.7, 1.4, size=kits.shape)

    per_site = cfg.persons_per_site + cfg.test_persons_per_site
    n_persons = num_sites * per_site
    person_site = np.repeat(np.arange(num_sites), per_site)
    person_is_test = np.tile(np.arange(per_site) >= cfg.persons_per_site, num_sites)
    n_seq, n_cls = cfg.sequences_per_person, len(spec.classes)
    labels = rng_person.permuted(np.tile(np.arange(n_seq) % n_cls, (n_persons, 1)), axis=1)
    y = labels.reshape(-1).astype(np.int64)
    person = np.repeat(np.arange(n_persons), n_seq)
    site = person_site[person]
    latent, strength = _latent(spec.centers, y, person, n_persons, cfg.seq_len, rng_seq)
    intensity = (strength >= sum(_STRENGTH_RANGE) / 2).astype(np.int64)

    blocks, slices, start = [], [], 0
    hold = (np.arange(cfg.seq_len) // 2) * 2
    for j, name in enumerate(MODALITIES):
        w = spec.loadings[name]
        n_feat = w.shape[1]
        sig = _modality_signal(name, latent, w, rng_seq)
        baseline = rng_person.normal(0.0, _PERSON_BASELINE_SD, size=(n_persons, n_feat))
        gain = rng_person.lognormal(0.0, _PERSON_GAIN_SD, size=n_persons)
        site_gain = rng_site.lognormal(0.0, _SITE_GAIN_SD, size=(num_sites, n_feat))
        site_off = rng_site.normal(0.0, _SITE_OFFSET_SD, size=(num_sites, n_feat))
        obs = baseline[person, None, :] + gain[person, None, None] * sig
        obs = site_gain[site, None, :] * obs + site_off[site, None, :]
        obs += (_NOISE[name] * noise_level[site, j])[:, None, None] * rng_sensor.normal(size=obs.shape)
        slow = half_rate[site, j]
        obs[slow] = obs[slow][:, hold]
        blocks.append(obs)
        slices.append((start, start + n_feat))
        start += n_feat
    x = np.concatenate(blocks, axis=2)
    mask = kits[site] & used[None, :]
    train = ~person_is_test[person]
    _standardize(x, mask, train, slices)
    x = x.astype(np.float32)

    def build(rows: np.ndarray) -> MultimodalDataset:
        full = MultimodalDataset(
            x=x[rows],
            mask=mask[rows],
            y=y[rows],
            person=person[rows].astype(np.int64),
            site=site[rows].astype(np.int64),
            modalities=MODALITIES,
            feature_slices=tuple(slices),
            class_names=spec.classes,
            intensity=intensity[rows],
            intensity_names=INTENSITY_NAMES,
        )
        return full.with_mask(full.mask)  # zero the columns of absent modalities

    _log.debug("synthetic %s: %d sites, kits=%s", cfg.scenario, num_sites, kits.astype(int).tolist())
    blind = np.flatnonzero(~(kits & used).any(axis=1))
    if blind.size:
        _log.info("sites %s lack every one of data.modalities=%s: masks all False", blind, cfg.modalities)
    return DatasetSplit(train=build(np.flatnonzero(train)), test=build(np.flatnonzero(~train)))


def _standardize(x: np.ndarray, mask: np.ndarray, train: np.ndarray, slices: list[tuple[int, int]]) -> None:
    """In place: per-column z-score with statistics of present training samples only."""
    for j, (a, b) in enumerate(slices):
        rows = train & mask[:, j]
        if not rows.any():
            continue
        ref = x[rows, :, a:b]
        mean = ref.mean(axis=(0, 1))
        std = ref.std(axis=(0, 1)) + 1e-6
        x[:, :, a:b] = (x[:, :, a:b] - mean) / std
