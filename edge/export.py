"""Export any fedge model to ONNX for a device developer: raw inputs in, class scores out.

* **Self-describing file.** The ONNX ``metadata_props`` (and a sidecar ``<stem>.json``) say what
  goes in and what comes out: input name, shape, dtype, the raw value range, how to build the
  inputs from the dataset, the scaling the graph applies, class names and order, the dataset and
  model, and what the output scores mean (see :class:`InputSpec`). An app needs nothing else.
* **Scaling inside the graph.** fedge's loaders scale some datasets (digits: pixel / 16); the
  exported graph starts with that multiplication, so it takes the *raw* values a device sees.
* LoRA: pass the peft model; adapters are merged first (``merge_and_unload``: W' = W + (α/r)·B·A).
* Forward-forward: ``FFMLP.forward`` already scores every label, so the graph holds the whole
  FF inference procedure and returns (batch, C) scores.
* torch's current exporter (``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``), opset
  18, dynamic batch axis. The legacy TorchScript exporter is not used (torch deprecates it).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

OPSET = 18
SIDECAR_FORMAT = "fedge-onnx/1"
METADATA_PREFIX = "fedge."

# How to build a file of raw inputs for each built-in dataset (what a device app must replicate).
HOW_TO_BUILD = {
    "digits": (
        "sklearn.datasets.load_digits().data: pixel intensities 0..16, one row of 64 per image, "
        "reshaped to (n, 1, 8, 8) float32 (row-major 8x8); do not scale (the graph divides by 16)"
    ),
    "mnist1d": (
        "mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())['x']: (n, 40) float32 "
        "signals as generated; no scaling"
    ),
    "synthetic": "(n, 60) float32 feature vectors as the LEAF Synthetic generator draws them",
}
HUB_HOW_TO_BUILD = (
    "the dataset's feature column as fedge loads it: uint8 images divided by 255 (the graph does "
    "not do this), laid out (n, C, H, W) float32; other numeric columns as they are"
)
DATASET_SCALE = {"digits": 1.0 / 16.0}  # what clients/datasets.py multiplies raw values by
# How far outside the observed training range an input may go, in observed spans: new mnist1d
# samples reach ~4% of the span beyond the training set's min (-4.50 vs -4.20); a wrongly built
# input (pixels scaled twice, another dataset, garbage) is off by whole spans or factors.
RANGE_TOLERANCE_SPANS = 0.25
RANGE_NOTE = (
    "observed_train_range is the min/max of the raw training inputs, not a hard limit: accept "
    "inputs within range_tolerance of it (accepted_range); far outside, they were not built as "
    "how_to_build says"
)


@dataclass(frozen=True)
class InputSpec:
    """What the exported graph expects and returns (written to metadata_props and the sidecar)."""

    dataset: str
    shape: tuple[int, ...]  # per sample; the batch axis comes first and is dynamic
    # min/max of the raw training inputs: what was seen, not a limit (new inputs of the same
    # source fall a little outside it); inputs within range_tolerance of it are accepted
    observed_train_range: tuple[float, float]
    class_names: list[str]
    scale: float = 1.0  # the graph multiplies raw inputs by this first
    how_to_build: str = ""
    model: str = ""
    dtype: str = "float32"
    input_name: str = "x"
    output_name: str = "scores"
    output_meaning: str = (
        "unnormalised class scores (logits; summed goodness for forward-forward): the predicted "
        "class is the argmax, class_names[argmax] its name; softmax gives probabilities for "
        "logits"
    )
    extra: dict[str, str] = field(default_factory=dict)
    range_tolerance: float = -1.0  # < 0: RANGE_TOLERANCE_SPANS x the observed span

    def __post_init__(self) -> None:
        if self.range_tolerance < 0:
            lo, hi = self.observed_train_range
            object.__setattr__(self, "range_tolerance", RANGE_TOLERANCE_SPANS * (hi - lo))

    @property
    def accepted_range(self) -> tuple[float, float]:
        """The observed training range widened by the tolerance on both sides."""
        lo, hi = self.observed_train_range
        return (lo - self.range_tolerance, hi + self.range_tolerance)

    def sidecar(self, fp32: Path, int8: Path | None, exporter: str) -> dict:
        d = asdict(self)
        return {
            "format": SIDECAR_FORMAT,
            "model_file": fp32.name,
            "int8_file": int8.name if int8 is not None else None,
            "exporter": exporter,
            "input": {
                "name": self.input_name,
                "shape": ["batch", *self.shape],
                "dtype": self.dtype,
                "observed_train_range": list(self.observed_train_range),
                "range_tolerance": self.range_tolerance,
                "accepted_range": list(self.accepted_range),
                "range_note": RANGE_NOTE,
                "scaling_in_graph": self.scale,
                "how_to_build": self.how_to_build,
            },
            "output": {
                "name": self.output_name,
                "shape": ["batch", len(self.class_names)],
                "meaning": self.output_meaning,
            },
            "class_names": d["class_names"],
            "dataset": self.dataset,
            "model": self.model,
            **self.extra,
        }

    def metadata(self) -> dict[str, str]:
        """Flat string map for ONNX ``metadata_props`` (values JSON where not plain text)."""
        return {
            f"{METADATA_PREFIX}dataset": self.dataset,
            f"{METADATA_PREFIX}model": self.model,
            f"{METADATA_PREFIX}input_name": self.input_name,
            f"{METADATA_PREFIX}input_shape": json.dumps(["batch", *self.shape]),
            f"{METADATA_PREFIX}input_dtype": self.dtype,
            f"{METADATA_PREFIX}input_observed_train_range": json.dumps(
                list(self.observed_train_range)
            ),
            f"{METADATA_PREFIX}input_range_tolerance": repr(self.range_tolerance),
            f"{METADATA_PREFIX}input_scaling_in_graph": repr(self.scale),
            f"{METADATA_PREFIX}input_how_to_build": self.how_to_build,
            f"{METADATA_PREFIX}output_name": self.output_name,
            f"{METADATA_PREFIX}output_meaning": self.output_meaning,
            f"{METADATA_PREFIX}class_names": json.dumps(self.class_names),
            **{f"{METADATA_PREFIX}{k}": v for k, v in self.extra.items()},
        }


def dataset_input_spec(
    dataset: str, shape: tuple[int, ...], num_classes: int, x_scaled: np.ndarray, model: str
) -> InputSpec:
    """The spec of a fedge dataset; ``x_scaled`` (training inputs as fedge's loader gives them)
    sets the observed training range."""
    scale = DATASET_SCALE.get(dataset, 1.0)
    raw = np.asarray(x_scaled, dtype=np.float64) / scale
    return InputSpec(
        dataset=dataset,
        shape=tuple(shape),
        observed_train_range=(float(raw.min()), float(raw.max())) if raw.size else (0.0, 0.0),
        class_names=[str(c) for c in range(num_classes)],
        scale=scale,
        how_to_build=HOW_TO_BUILD.get(dataset, HUB_HOW_TO_BUILD),
        model=model,
    )


@dataclass(frozen=True)
class ExportResult:
    fp32_path: Path
    int8_path: Path | None
    fp32_bytes: int
    int8_bytes: int | None
    exporter: str
    sidecar_path: Path | None = None


class ScaledInput(nn.Module):
    """``model(x · scale)``: the dataset's input scaling as the graph's first op."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale)


def plain_model(model: nn.Module) -> nn.Module:
    """The model to export: peft-wrapped models are merged into their base first."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval().to("cpu")


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def export_onnx(
    model: nn.Module,
    sample: torch.Tensor,
    path: str | Path,
    quantize: bool = True,
    spec: InputSpec | None = None,
) -> ExportResult:
    """Write ``path`` (fp32, input ``x`` and output ``scores`` with a dynamic batch axis) and
    ``<stem>.int8.onnx``; both pass ``onnx.checker``. With ``spec``, the graph takes raw inputs
    (it multiplies by ``spec.scale`` first; ``sample`` is then raw too), both files carry the spec
    in ``metadata_props`` and ``<stem>.json`` is written beside them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = plain_model(model)
    if spec is not None and spec.scale != 1.0:
        model = ScaledInput(model, spec.scale).eval()
    sample = sample.to(torch.float32).cpu()
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
    exporter = f"torch.onnx.export(dynamo=True), torch {torch.__version__}, opset {OPSET}"
    if spec is not None:
        _set_metadata(path, spec.metadata())
    onnx.checker.check_model(onnx.load(str(path)))
    int8_path = int8_bytes = None
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8_path = path.with_name(path.stem + ".int8.onnx")
        quantize_dynamic(str(path), str(int8_path), weight_type=QuantType.QInt8)
        if spec is not None:
            _set_metadata(int8_path, spec.metadata())
        onnx.checker.check_model(onnx.load(str(int8_path)))
        int8_bytes = int8_path.stat().st_size
    sidecar = None
    if spec is not None:
        sidecar = path.with_suffix(".json")
        sidecar.write_text(
            json.dumps(spec.sidecar(path, int8_path, exporter), indent=2) + "\n", encoding="utf-8"
        )
    return ExportResult(path, int8_path, path.stat().st_size, int8_bytes, exporter, sidecar)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``fedge.*`` metadata of an exported file (empty for files fedge did not write)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {
        p.key.removeprefix(METADATA_PREFIX): p.value
        for p in proto.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }


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
