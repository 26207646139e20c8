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

Per site, per person: every site's sensors and every person's sequences come from their own
random stream (seeded by the run seed and the site / person index), so a client builds its own
site and nothing else, in any process, with the values it would have in the whole pool; the pool
is the sites' persons side by side. Features are standardised with the statistics of the
training persons of the first ``REFERENCE_SITES`` sites (all of them when there are fewer), a
fixed amount of work whatever the federation's size; the server's held-out set is the
``test_persons_per_site`` held-out persons of the first ``data.test_sites`` sites, so it does not
grow with the federation either. (Before this layout one stream drew every site in turn: the same
distributions, different values; figures measured before it differ in their digits.)

Layout: both scenarios keep the full 4-modality layout of ``config.MODALITIES``; in
``clinic`` the ``can`` columns are always zero and its mask False, so model code is
uniform. Modalities outside ``DataConfig.modality_list`` are masked the same way (the
random draws do not depend on it, so restricting modalities changes nothing else); a
site with none of the selected sensors then yields samples whose mask is all False.
Standardisation statistics count present training samples only.

Each sample also carries an intensity label, like RAVDESS' normal/strong: the expressivity
factor that already scales its latent trajectory (uniform on [0.6, 1.3]) cut at its
midpoint, so the label costs no extra random draw and changes no feature value.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from fedmer.config import MODALITIES, ConfigError, DataConfig
from fedmer.data.base import DatasetSplit, MultimodalDataset

__all__ = [
    "INTENSITY_NAMES",
    "REFERENCE_SITES",
    "generate_synthetic",
    "held_out_sites",
    "reference_sites",
    "scenario_class_names",
    "synthetic_site",
    "synthetic_site_size",
    "synthetic_test",
]

_log = logging.getLogger(__name__)

#: Intensity levels of every synthetic sample (``MultimodalDataset.intensity_names``).
INTENSITY_NAMES: tuple[str, ...] = ("normal", "strong")
_STRENGTH_RANGE = (0.6, 1.3)  # expressivity factor of a sample's latent trajectory
#: Sites (the first ones) whose training persons give the standardisation statistics.
REFERENCE_SITES = 10
# Stream tags: each site and each person draws from its own stream ([seed, tag, site(, person)]),
# so any one of them is generated alone, in any process, with the same values.
_SITE_STREAM = 11
_PERSON_STREAM = 12

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


@dataclass(frozen=True)
class _Site:
    """One site's sensors: its kit, half-rate sensors, noise level, per-feature gain and offset."""

    kit: np.ndarray  # (M,) bool: which sensors the site has
    half_rate: np.ndarray  # (M,) bool: sensor updates every second frame (sample-and-hold)
    noise_level: np.ndarray  # (M,) scale of the site's sensor noise
    gain: tuple[np.ndarray, ...]  # per modality: (F,) sensor gain
    offset: tuple[np.ndarray, ...]  # per modality: (F,) sensor offset


def _site(spec: _Scenario, seed: int, site: int) -> _Site:
    """Site ``site``'s sensors, from its own stream: the same whichever other sites exist."""
    rng = np.random.default_rng([seed, _SITE_STREAM, site])
    probs = np.asarray(spec.availability)
    for _ in range(100):  # every site keeps speech or at least two modalities
        kit = rng.random(len(MODALITIES)) < probs
        if kit[0] or kit.sum() >= 2:
            break
    else:  # unreachable for the built-in scenarios; keep the best-equipped kit
        kit = probs > 0
    half_rate = rng.random(len(MODALITIES)) < _HALF_RATE_P
    half_rate[0] = False  # microphones always run at the full frame rate
    noise_level = rng.uniform(0.7, 1.4, size=len(MODALITIES))
    gain: list[np.ndarray] = []
    offset: list[np.ndarray] = []
    for name in MODALITIES:
        n_feat = spec.loadings[name].shape[1]
        gain.append(np.asarray(rng.lognormal(0.0, _SITE_GAIN_SD, size=n_feat)))
        offset.append(np.asarray(rng.normal(0.0, _SITE_OFFSET_SD, size=n_feat)))
    return _Site(kit, half_rate, noise_level, tuple(gain), tuple(offset))


def _lowpass(x: np.ndarray, beta: float) -> np.ndarray:
    """First-order lag along time (axis 1): physiology and vehicle speed respond slowly."""
    out = np.empty_like(x)
    out[:, 0] = x[:, 0]
    for t in range(1, x.shape[1]):
        out[:, t] = out[:, t - 1] + beta * (x[:, t] - out[:, t - 1])
    return out


def _project(latent: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``latent @ w`` for one person: the same shapes in every process, so the same numbers."""
    n, t, k = latent.shape
    return (latent.reshape(n * t, k) @ w).reshape(n, t, w.shape[1])


def _latent(
    centers: np.ndarray, y: np.ndarray, seq_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(N, T, 3) latent state of one person: own class centre x onset ramp + AR(1) drift.

    Also returns each sample's (N,) expressivity factor, the source of its intensity label.
    """
    n = len(y)
    jitter = rng.normal(0.0, _PERSON_CENTER_SD, size=(len(centers), 3))
    target = centers[y] + jitter[y]
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
    sig = _project(latent, w)
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


@dataclass(frozen=True)
class _Person:
    """One person's raw (unstandardised) sequences."""

    x: np.ndarray  # (n, T, F) float64
    y: np.ndarray  # (n,) int64
    strength: np.ndarray  # (n,) expressivity factor


def _person(spec: _Scenario, cfg: DataConfig, seed: int, site: _Site, site_id: int, index: int) -> _Person:
    """Person ``index`` of site ``site_id`` (training persons first, then held-out), from its own stream."""
    rng = np.random.default_rng([seed, _PERSON_STREAM, site_id, index])
    n_seq, n_cls = cfg.sequences_per_person, len(spec.classes)
    y = rng.permutation(np.arange(n_seq) % n_cls).astype(np.int64)  # classes balanced per person
    latent, strength = _latent(spec.centers, y, cfg.seq_len, rng)
    hold = (np.arange(cfg.seq_len) // 2) * 2
    blocks = []
    for j, name in enumerate(MODALITIES):
        w = spec.loadings[name]
        sig = _modality_signal(name, latent, w, rng)
        baseline = rng.normal(0.0, _PERSON_BASELINE_SD, size=w.shape[1])
        gain = rng.lognormal(0.0, _PERSON_GAIN_SD)
        obs = site.gain[j] * (baseline + gain * sig) + site.offset[j]
        obs += (_NOISE[name] * site.noise_level[j]) * rng.normal(size=obs.shape)
        if site.half_rate[j]:
            obs = obs[:, hold]
        blocks.append(obs)
    return _Person(np.concatenate(blocks, axis=2), y, strength)


def _checked(cfg: DataConfig, num_sites: int) -> tuple[_Scenario, np.ndarray]:
    """The scenario and the (M,) modalities in use; ConfigError for a bad site count or selection."""
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
    return spec, used


def _slices(spec: _Scenario) -> tuple[tuple[int, int], ...]:
    ends = np.cumsum([spec.loadings[m].shape[1] for m in MODALITIES])
    return tuple((int(b - spec.loadings[m].shape[1]), int(b)) for m, b in zip(MODALITIES, ends, strict=True))


def reference_sites(num_sites: int) -> int:
    """How many sites (the first ones) give the standardisation statistics."""
    return min(num_sites, REFERENCE_SITES)


@dataclass(frozen=True)
class _Raw:
    """Unstandardised sequences of some persons, side by side, with their labels and owners."""

    x: np.ndarray  # (N, T, F) float64
    mask: np.ndarray  # (N, M) sensor present and modality selected
    y: np.ndarray
    strength: np.ndarray
    person: np.ndarray
    site: np.ndarray


def _raw(cfg: DataConfig, num_sites: int, seed: int, who: list[tuple[int, int]]) -> _Raw:
    """The persons ``who`` = [(site, person index), ...], in that order, each from its own stream."""
    spec, used = _checked(cfg, num_sites)
    per_site = cfg.persons_per_site + cfg.test_persons_per_site
    n_seq = cfg.sequences_per_person
    people: list[_Person] = []
    masks, persons, sites = [], [], []
    site, site_id = None, -1
    for s, p in who:
        if site is None or s != site_id:
            site, site_id = _site(spec, seed, s), s
        people.append(_person(spec, cfg, seed, site, s, p))
        masks.append(np.repeat((site.kit & used)[None, :], n_seq, axis=0))
        persons.append(np.full(n_seq, s * per_site + p, dtype=np.int64))
        sites.append(np.full(n_seq, s, dtype=np.int64))
    return _Raw(
        x=np.concatenate([q.x for q in people]),
        mask=np.concatenate(masks),
        y=np.concatenate([q.y for q in people]),
        strength=np.concatenate([q.strength for q in people]),
        person=np.concatenate(persons),
        site=np.concatenate(sites),
    )


_Stats = tuple[tuple[np.ndarray, np.ndarray], ...]


def _stats_of(x: np.ndarray, mask: np.ndarray, slices: tuple[tuple[int, int], ...]) -> _Stats:
    """Per modality (mean, std) of each column over the samples that have it."""
    stats = []
    for j, (a, b) in enumerate(slices):
        ref = x[mask[:, j], :, a:b]
        if not len(ref):  # no reference site has this sensor: leave its columns as generated
            _log.info("no reference site has %s: its columns are not standardised", MODALITIES[j])
            stats.append((np.zeros(b - a), np.ones(b - a)))
            continue
        stats.append((ref.mean(axis=(0, 1)), ref.std(axis=(0, 1)) + 1e-6))
    return tuple(stats)


def _reference_who(cfg: DataConfig, num_ref: int) -> list[tuple[int, int]]:
    return [(s, p) for s in range(num_ref) for p in range(cfg.persons_per_site)]


@functools.lru_cache(maxsize=8)
def _reference_stats(cfg: DataConfig, num_ref: int, seed: int) -> _Stats:
    """Statistics of the training persons of sites ``0..num_ref-1``.

    Cached per process: every site a process builds is standardised with the same numbers, and
    building them costs the same at 10 sites as at 10,000.
    """
    spec, _ = _checked(cfg, num_ref)
    raw = _raw(cfg, num_ref, seed, _reference_who(cfg, num_ref))
    return _stats_of(raw.x, raw.mask, _slices(spec))


def _dataset(cfg: DataConfig, raw: _Raw, stats: _Stats) -> MultimodalDataset:
    """Standardise ``raw`` with ``stats``, as float32, absent modalities zeroed."""
    spec = _scenario(cfg.scenario)
    slices = _slices(spec)
    mean = np.concatenate([m for m, _ in stats])  # one contiguous pass over x, not one per slice
    std = np.concatenate([sd for _, sd in stats])
    full = MultimodalDataset(
        x=((raw.x - mean) / std).astype(np.float32),
        mask=raw.mask,
        y=raw.y,
        person=raw.person,
        site=raw.site,
        modalities=MODALITIES,
        feature_slices=slices,
        class_names=spec.classes,
        intensity=(raw.strength >= sum(_STRENGTH_RANGE) / 2).astype(np.int64),
        intensity_names=INTENSITY_NAMES,
    )
    return full.with_mask(full.mask)  # zero the columns of absent modalities


def _persons(cfg: DataConfig, num_sites: int, seed: int, who: list[tuple[int, int]]) -> MultimodalDataset:
    """The standardised sequences of ``who`` = [(site, person index), ...], in that order."""
    raw = _raw(cfg, num_sites, seed, who)
    return _dataset(cfg, raw, _reference_stats(cfg, reference_sites(num_sites), seed))


def _check_site(site: int, num_sites: int) -> None:
    if isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < num_sites:
        raise ConfigError(f"invalid site={site!r}: expected an integer in 0..{num_sites - 1}")


def synthetic_site(cfg: DataConfig, num_sites: int, seed: int, site: int) -> MultimodalDataset:
    """The training persons of site ``site`` alone: what client ``site`` holds under ``partition=site``.

    Equal to that site's rows of ``generate_synthetic(cfg, num_sites, seed).train``, built without
    generating any other site's persons (beyond the reference sites' statistics, once per process).
    """
    _check_site(site, num_sites)
    return _persons(cfg, num_sites, seed, [(site, p) for p in range(cfg.persons_per_site)])


def synthetic_site_size(cfg: DataConfig, num_sites: int, site: int) -> int:
    """Training samples of site ``site``, without generating anything."""
    _check_site(site, num_sites)
    return cfg.persons_per_site * cfg.sequences_per_person


def held_out_sites(cfg: DataConfig, num_sites: int) -> int:
    """How many sites (the first ones) contribute their held-out persons to the test set."""
    return min(num_sites, cfg.test_sites)


def synthetic_test(cfg: DataConfig, num_sites: int, seed: int) -> MultimodalDataset:
    """The server's held-out persons: ``test_persons_per_site`` of each of the first ``data.test_sites``.

    Its size does not grow with the federation: at 10,000 sites the server still scores the
    global model on the persons of at most ``data.test_sites`` sites.
    """
    return _persons(cfg, num_sites, seed, _test_who(cfg, num_sites))


def _test_who(cfg: DataConfig, num_sites: int) -> list[tuple[int, int]]:
    """The held-out persons: indices after a site's training persons, of the first test sites."""
    first, n = cfg.persons_per_site, cfg.test_persons_per_site
    return [(s, first + p) for s in range(held_out_sites(cfg, num_sites)) for p in range(n)]


def generate_synthetic(cfg: DataConfig, num_sites: int, seed: int) -> DatasetSplit:
    """Training persons of every site and the held-out test persons, deterministic in ``seed``."""
    spec, _ = _checked(cfg, num_sites)
    num_ref = reference_sites(num_sites)
    raw = _raw(cfg, num_sites, seed, [(s, p) for s in range(num_sites) for p in range(cfg.persons_per_site)])
    # the reference persons are the pool's first rows: their statistics without generating them twice
    head = len(_reference_who(cfg, num_ref)) * cfg.sequences_per_person
    stats = _stats_of(raw.x[:head], raw.mask[:head], _slices(spec))
    train = _dataset(cfg, raw, stats)
    blind = np.unique(train.site[~train.mask.any(axis=1)])
    if blind.size:
        _log.info("sites %s lack every one of data.modalities=%s: masks all False", blind, cfg.modalities)
    held_out = _dataset(cfg, _raw(cfg, num_sites, seed, _test_who(cfg, num_sites)), stats)
    return DatasetSplit(train=train, test=held_out)
