"""Export any fedge model to ONNX (dynamic batch axis, checked) plus an int8 dynamic-quantized copy.

* LoRA: pass the peft model; adapters are merged first (``merge_and_unload``: W' = W + (α/r)·B·A).
* Forward-forward: ``FFMLP.forward`` already scores every label, so the graph holds the whole
  FF inference procedure and returns (batch, C) scores.
* The dynamo exporter (needs ``onnxscript``) is tried first; the legacy TorchScript exporter
  (``dynamo=False``) is the fallback.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

OPSET = 18


@dataclass(frozen=True)
class ExportResult:
    fp32_path: Path
    int8_path: Path | None
    fp32_bytes: int
    int8_bytes: int | None
    exporter: str


def plain_model(model: nn.Module) -> nn.Module:
    """The model to export: peft-wrapped models are merged into their base first."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval().to("cpu")


def export_onnx(
    model: nn.Module,
    sample: torch.Tensor,
    path: str | Path,
    quantize: bool = True,
    dynamo: bool = True,
) -> ExportResult:
    """Write ``path`` (fp32, input ``x`` and output ``scores`` with a dynamic batch axis) and
    ``<stem>.int8.onnx``; both pass ``onnx.checker``. ``dynamo=False`` goes straight to the legacy
    exporter (10-100× faster to export small models; same graph semantics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = plain_model(model)
    sample = sample.to(torch.float32).cpu()
    exporter = "dynamo"
    try:
        if not dynamo:
            raise NotImplementedError("legacy exporter requested")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (sample,),
                str(path),
                input_names=["x"],
                output_names=["scores"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception:  # the legacy exporter handles what dynamo cannot (and vice versa)
        exporter = "torchscript"
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            input_names=["x"],
            output_names=["scores"],
            dynamic_axes={"x": {0: "batch"}, "scores": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))
    int8_path = int8_bytes = None
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8_path = path.with_name(path.stem + ".int8.onnx")
        quantize_dynamic(str(path), str(int8_path), weight_type=QuantType.QInt8)
        onnx.checker.check_model(onnx.load(str(int8_path)))
        int8_bytes = int8_path.stat().st_size
    return ExportResult(path, int8_path, path.stat().st_size, int8_bytes, exporter)


def session(path: str | Path):
    """An onnxruntime session (CUDA first when the provider is there, else CPU)."""
    import onnxruntime as ort

    providers = [
        p
        for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
        if p in ort.get_available_providers()
    ]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers)


def run_onnx(sess, x: np.ndarray) -> np.ndarray:
    """Scores of ``x`` (float32, batch first) from an onnxruntime session."""
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
