"""Edge deployment of a trained global model: a self-contained bundle, ONNX/TorchScript export,
int8 quantisation, and prediction on recordings (``fedmer export``, ``fedmer predict``).

Only the bundle is imported here (the run recorder writes one at the end of every run);
``fedmer.edge.export`` (onnx, onnxruntime) and ``fedmer.edge.predict`` load on demand.
"""

from fedmer.edge.bundle import (
    BundleError,
    BundleMeta,
    ModelBundle,
    bundle_meta,
    load_bundle,
    open_bundle,
    save_bundle,
    write_run_bundle,
)

__all__ = [
    "BundleError",
    "BundleMeta",
    "ModelBundle",
    "bundle_meta",
    "load_bundle",
    "open_bundle",
    "save_bundle",
    "write_run_bundle",
]
