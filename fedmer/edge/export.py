"""ONNX and TorchScript export of a bundle's model, int8 quantisation, and the parity check.

The ONNX graph takes exactly what the PyTorch model takes:

* ``x``: float32 ``(batch, seq_len, num_features)``, the packed features (columns
  ``feature_slices[m]`` belong to modality ``m``; see the bundle's metadata);
* ``mask``: float32 ``(batch, num_modalities)``, 1 = recorded, 0 = missing. A missing
  modality's columns are ignored (zeroed inside the graph) and its embedding hidden from
  the fusion, exactly as in training; a row of zeros still gives finite output;

and returns ``logits`` ``(batch, num_classes)`` and ``probabilities`` (their softmax). The
batch axis is dynamic; ``seq_len`` and the feature count are fixed by the bundle. The bundle's
metadata (classes, modalities, slices, front-ends, privacy statement) is stored in the ONNX
file's ``metadata_props`` under ``fedmer.bundle``, so the ONNX file also stands on its own.

Exported with torch's TorchScript-based ONNX exporter (``dynamo=False``, opset 17): it
handles every encoder and fusion here and needs no ``onnxscript``. Int8 is onnxruntime's
dynamic quantisation (weights int8, activations quantised on the fly).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedmer.edge.bundle import ModelBundle

__all__ = [
    "FLOAT_TOLERANCE",
    "OPSET",
    "OnnxModel",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "parity",
    "quantize_int8",
    "sample_inputs",
]

log = logging.getLogger(__name__)

OPSET = 17
#: Max absolute difference allowed between float ONNX and PyTorch logits (float32 rounding).
FLOAT_TOLERANCE = 1e-4


class _EdgeHead(nn.Module):
    """The model's category logits and their softmax: what an edge caller needs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x, mask)
        return logits, torch.softmax(logits, dim=-1)


def sample_inputs(bundle: ModelBundle, batch: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random ``(x, mask)`` of the bundle's layout; every mask pattern cycles through the rows."""
    g = torch.Generator().manual_seed(seed)
    m = bundle.meta
    x = torch.randn(batch, m.seq_len, m.num_features, generator=g)
    k = len(m.modalities)
    patterns = torch.tensor([[(i >> j) & 1 for j in range(k)] for i in range(2**k - 1, -1, -1)])
    mask = patterns[torch.arange(batch) % len(patterns)].float()  # all present first, all missing last
    return x, mask


def export_onnx(bundle: ModelBundle, path: str | Path) -> Path:
    """Write the bundle's model as ONNX (inputs ``x``, ``mask``; outputs ``logits``, ``probabilities``)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = _EdgeHead(bundle.model).eval()
    with warnings.catch_warnings():  # tracer warnings about the model's shape checks
        warnings.simplefilter("ignore")
        torch.onnx.export(
            head,
            sample_inputs(bundle, batch=2),
            str(path),
            dynamo=False,
            input_names=["x", "mask"],
            output_names=["logits", "probabilities"],
            dynamic_axes={n: {0: "batch"} for n in ("x", "mask", "logits", "probabilities")},
            opset_version=OPSET,
        )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "fedmer.bundle", json.dumps(bundle.meta.to_json())
    onnx.save(proto, str(path))
    log.info("exported ONNX to %s (%d bytes)", path, path.stat().st_size)
    return path


def export_torchscript(bundle: ModelBundle, path: str | Path) -> Path | None:
    """Trace the model to TorchScript (``forward(x, mask) -> logits``); None where tracing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(bundle.model.eval(), sample_inputs(bundle, batch=2))
            traced.save(str(path))
    except (RuntimeError, TypeError) as err:
        log.warning("TorchScript tracing failed (%s); use the ONNX export", err)
        return None
    return path


def quantize_int8(onnx_path: str | Path, out_path: str | Path) -> Path:
    """Dynamic int8 quantisation of an exported ONNX model (weights int8, activations on the fly)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path = Path(out_path)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its advice to pre-process goes to the root logger, every call
    try:
        quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8)
    finally:
        logging.disable(previous)
    return out_path


@dataclass
class OnnxModel:
    """An onnxruntime session over an exported model: ``logits(x, mask)`` as numpy."""

    path: Path
    threads: int = 1

    def __post_init__(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    def logits(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = self.session.run(["logits"], {"x": x.astype(np.float32), "mask": mask.astype(np.float32)})
        return np.asarray(out[0])

    def metadata(self) -> dict[str, Any]:
        """The bundle metadata stored in the ONNX file."""
        props = self.session.get_modelmeta().custom_metadata_map
        return dict(json.loads(props["fedmer.bundle"])) if "fedmer.bundle" in props else {}


@torch.no_grad()
def parity(bundle: ModelBundle, onnx_path: str | Path, x: Tensor, mask: Tensor) -> dict[str, float]:
    """ONNX vs PyTorch on ``(x, mask)``: max absolute logit difference and argmax agreement."""
    ref = bundle.model.eval()(x, mask).numpy()
    got = OnnxModel(Path(onnx_path)).logits(x.numpy(), mask.numpy())
    return {
        "max_abs_diff": float(np.abs(ref - got).max()),
        "agreement": float((ref.argmax(axis=1) == got.argmax(axis=1)).mean()),
        "n": float(len(ref)),
    }


def export_model(
    bundle: ModelBundle,
    out_dir: str | Path,
    *,
    int8: bool = False,
    torchscript: bool = False,
    n_check: int = 64,
) -> dict[str, Any]:
    """Write ``model.onnx`` (+ ``model.int8.onnx``, ``model.torchscript.pt``) and check each against PyTorch.

    Parity is measured on ``n_check`` random inputs cycling through every modality mask; the
    float export must stay within :data:`FLOAT_TOLERANCE` (else ``RuntimeError``), int8 is
    reported as its argmax agreement with PyTorch.
    """
    out = Path(out_dir)
    x, mask = sample_inputs(bundle, batch=n_check, seed=1)
    onnx_path = export_onnx(bundle, out / "model.onnx")
    check = parity(bundle, onnx_path, x, mask)
    if not check["max_abs_diff"] <= FLOAT_TOLERANCE:
        raise RuntimeError(
            f"ONNX logits differ from PyTorch by {check['max_abs_diff']:.2e} > {FLOAT_TOLERANCE}"
        )
    m = bundle.meta
    report: dict[str, Any] = {
        "inputs": {
            "x": f"float32 (batch, {m.seq_len}, {m.num_features})",
            "mask": f"float32 (batch, {len(m.modalities)}) over {list(m.modalities)}; 1=present",
        },
        "outputs": {
            "logits": f"(batch, {len(bundle.meta.class_names)})",
            "probabilities": "softmax of logits",
        },
        "class_names": list(bundle.meta.class_names),
        "files": {"onnx": {"path": str(onnx_path), "bytes": onnx_path.stat().st_size, **check}},
        "tolerance": FLOAT_TOLERANCE,
    }
    if int8:
        q = quantize_int8(onnx_path, out / "model.int8.onnx")
        report["files"]["onnx_int8"] = {
            "path": str(q),
            "bytes": q.stat().st_size,
            **parity(bundle, q, x, mask),
        }
    if torchscript:
        ts = export_torchscript(bundle, out / "model.torchscript.pt")
        if ts is not None:
            with torch.no_grad():
                diff = float((torch.jit.load(str(ts))(x, mask) - bundle.model(x, mask)).abs().max())
            report["files"]["torchscript"] = {
                "path": str(ts),
                "bytes": ts.stat().st_size,
                "max_abs_diff": diff,
            }
    return report
