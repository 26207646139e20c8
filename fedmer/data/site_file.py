"""A site's own data as one file: what a deployed car or hospital node trains on.

In simulation every client's data is a partition of one shared dataset. A real site holds
only its own recordings, already turned into features by its own front-end, so a SuperNode
names one ``.npz`` file in its node config (``data-file=...``) and trains on everything in it:
no shared copy, no partitioning. The file carries the packed features, the modality mask,
labels, person ids and the layout (modalities, feature slices, class names), so a mismatch with
the federation's model is refused with a message that names it, before any training.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from fedmer.data.base import MultimodalDataset

__all__ = ["SiteFileError", "load_site_file", "save_site_file"]

_ARRAYS = ("x", "mask", "y", "person", "site")
_LAYOUT = "layout"


class SiteFileError(ValueError):
    """The site's data file is missing, corrupt, or does not match the federation's layout."""


def save_site_file(data: MultimodalDataset, path: str | Path) -> Path:
    """Write ``data`` as a site file (``.npz``: arrays plus a JSON layout)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = {
        "modalities": list(data.modalities),
        "feature_slices": [list(s) for s in data.feature_slices],
        "class_names": list(data.class_names),
    }
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **{k: getattr(data, k) for k in _ARRAYS}, layout=np.array(json.dumps(layout)))
    tmp.replace(path)
    return path


def load_site_file(path: str | Path, modalities: tuple[str, ...] | None = None) -> MultimodalDataset:
    """The site's samples; ``modalities`` (the run's, in order) must match the file's layout."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SiteFileError(
            f"data-file={str(path)!r} does not exist: give the path of this site's .npz data file"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in (*_ARRAYS, _LAYOUT) if k not in npz.files]
            if missing:
                raise SiteFileError(
                    f"data-file={str(path)!r} lacks {missing}: write it with fedmer deploy site-data"
                )
            arrays = {k: npz[k] for k in _ARRAYS}
            layout = json.loads(str(npz[_LAYOUT]))
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as err:
        if isinstance(err, SiteFileError):
            raise
        raise SiteFileError(f"data-file={str(path)!r} is not a readable site file ({err})") from err
    if len(arrays["y"]) == 0:
        raise SiteFileError(f"data-file={str(path)!r} holds no samples")
    if not np.isfinite(arrays["x"]).all():
        raise SiteFileError(f"data-file={str(path)!r} has non-finite features (NaN or inf)")
    mods = tuple(layout["modalities"])
    if modalities is not None and mods != tuple(modalities):
        raise SiteFileError(
            f"data-file={str(path)!r} records modalities {list(mods)} but the run uses {list(modalities)}"
        )
    try:
        return MultimodalDataset(
            x=arrays["x"].astype(np.float32, copy=False),
            mask=arrays["mask"].astype(bool, copy=False),
            y=arrays["y"].astype(np.int64, copy=False),
            person=arrays["person"].astype(np.int64, copy=False),
            site=arrays["site"].astype(np.int64, copy=False),
            modalities=mods,
            feature_slices=tuple((int(a), int(b)) for a, b in layout["feature_slices"]),
            class_names=tuple(layout["class_names"]),
        )
    except ValueError as err:
        raise SiteFileError(f"data-file={str(path)!r}: {err}") from err
