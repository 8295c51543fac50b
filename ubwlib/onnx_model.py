"""Suspicious models as ONNX files: export a torch classifier, and query an ONNX file as a black box.

Verification (:func:`ubwlib.verify.verify`) needs only a callable ``images -> probabilities``. A model handed
over as an ONNX file becomes one with :func:`onnx_predictor`, which runs it with onnxruntime on the CPU. Reading
an ONNX file unpickles nothing and runs no code of the file's author: the file is a protobuf graph of standard
operators, and onnxruntime loads no custom-operator library unless the caller registers one (this module
never does).

The convention of :func:`export_onnx`, which :func:`onnx_predictor` expects of any file: one input named
``"images"``, ``float32`` ``N x C x H x W`` in ``[0, 1]`` (uint8 pixels divided by 255, as
:func:`ubwlib.train.to_model_input` feeds torch models) with a dynamic batch axis, and one output of class
scores ``N x K``: logits by default, or probabilities (``outputs="probabilities"``) for a model that ends with a
softmax. A file from another tool may name its input and output differently; its first input and first output
are used.

Needs the ``owner`` extra (``onnx``, ``onnxruntime``, ``onnxscript``), imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .cache import atomic_path

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "OUTPUTS", "export_onnx", "OnnxPredictor", "onnx_predictor"]

#: Name of the input of an exported model (float32 images in [0, 1], N x C x H x W).
INPUT_NAME = "images"
#: Name of the output of an exported model (logits, N x K).
OUTPUT_NAME = "logits"
#: What a model's output may be: ``"logits"`` (softmax applied by the predictor) or ``"probabilities"``.
OUTPUTS = ("logits", "probabilities")

_INSTALL_HINT = "install the owner extra: pip install 'ubwlib[owner]' (onnx, onnxruntime, onnxscript)"


def _check_image_shape(image_shape: Any, what: str = "image_shape") -> tuple[int, int, int]:
    try:
        values = tuple(image_shape)
    except TypeError:
        values = ()
    if len(values) != 3 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise ValueError(f"{what} must be (C, H, W), three positive ints, e.g. (1, 28, 28); got {image_shape!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _fmt(dims: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in dims) + ")"


def export_onnx(model: torch.nn.Module, image_shape: Sequence[int], path: str | Path, *, check: bool = True,
                opset_version: int | None = None) -> Path:
    """Export a torch classifier to an ONNX file for :func:`onnx_predictor`; returns ``path``.

    The file takes one input ``"images"``, float32 ``N x C x H x W`` in ``[0, 1]`` with ``(C, H, W) =
    image_shape`` and a dynamic batch axis ``N``, and returns the model's output ``"logits"`` (``N x K``). The
    model is traced in eval mode (``torch.onnx.export(..., dynamo=True)``, weights inside the file) and put back
    in the mode it was in. ``check``: run the file with onnxruntime on two random images and compare with the
    model (``RuntimeError`` if they differ by more than ``1e-4``). The file is written with
    :func:`ubwlib.cache.atomic_path` (a temporary sibling, renamed; an existing ``path`` is replaced).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = _check_image_shape(image_shape)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    sample = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    try:
        with atomic_path(path) as tmp:
            model.eval()
            try:
                with torch.no_grad():
                    torch.onnx.export(
                        model, (sample,), str(tmp), dynamo=True, external_data=False, verbose=False,
                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset_version,
                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                    )
            except ImportError as exc:
                raise ImportError(f"exporting to ONNX needs onnx and onnxscript ({exc}); {_INSTALL_HINT}") from exc
            if check:
                with torch.no_grad():
                    expected = model(sample).float().cpu().numpy()
                got = _session(tmp).run(None, {INPUT_NAME: sample.cpu().numpy()})[0]
                if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-4, rtol=1e-4):
                    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("nan")
                    raise RuntimeError(
                        f"the exported ONNX model disagrees with {type(model).__name__} (outputs {got.shape} vs "
                        f"{expected.shape}, max difference {diff:.3g}); export with check=False to keep it anyway")
    finally:
        model.train(was_training)
    return path


def _session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``path``; a file that is not a readable ONNX model -> ValueError."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError(f"running ONNX models needs onnxruntime; {_INSTALL_HINT}") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's InvalidProtobuf, Fail, InvalidGraph, NotImplemented...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{path} is not an ONNX model onnxruntime can load ({type(exc).__name__}: {first[:300]}); "
                         "export the model with ubwlib.onnx_model.export_onnx or torch.onnx.export") from None


class OnnxPredictor:
    """A black-box predictor ``images -> probabilities`` backed by an ONNX file (see :func:`onnx_predictor`).

    Attributes: ``path``; ``input_shape`` the model's declared ``(C, H, W)`` (``None`` for a dynamic axis);
    ``num_classes`` the declared output width (``None`` when dynamic and not given); ``outputs``; ``batch_size``.
    """

    def __init__(self, path: str | Path, *, image_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, batch_size: int = 256, outputs: str = "logits",
                 threads: int | None = None) -> None:
        if outputs not in OUTPUTS:
            raise ValueError(f"outputs must be one of {OUTPUTS} (what the model's output is), got {outputs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        key_shape = None if image_shape is None else _check_image_shape(image_shape)
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}" + (" (it is a folder)" if self.path.is_dir()
                                                                       else ""))
        self.outputs = outputs
        self.batch_size = batch_size
        self._session = _session(self.path, threads)
        inputs, outs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path.name} takes {len(inputs)} inputs ({[i.name for i in inputs]}); a classifier "
                             "for verification takes one: the images")
        inp = inputs[0]
        if inp.type != "tensor(float)":
            raise ValueError(f"{self.path.name} takes {inp.type} images; it must take float32 images in [0, 1] "
                             "(export the model with a float32 example input)")
        dims = list(inp.shape) if inp.shape is not None else []
        if len(dims) != 4:
            raise ValueError(f"{self.path.name} takes a {len(dims)}-d input {_fmt(dims)}; it must take images "
                             "N x C x H x W")
        self.input_name = inp.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in dims[1:])
        if key_shape is not None:
            self._check_shape(key_shape, "the key's images are")
        self.image_shape = key_shape
        out = outs[0]
        self.output_name = out.name
        out_dims = list(out.shape) if out.shape is not None else []
        if out_dims and len(out_dims) != 2:
            raise ValueError(f"{self.path.name}'s output {out.name!r} has shape {_fmt(out_dims)}; it must be N x K "
                             "class scores")
        declared = out_dims[-1] if out_dims and isinstance(out_dims[-1], int) else None
        if num_classes is not None and declared is not None and declared != num_classes:
            raise ValueError(
                f"{self.path.name} outputs {declared} class scores but the key's dataset has {num_classes} classes; "
                "use the model trained on the protected dataset (or a key of the dataset this model classifies)")
        self.num_classes = declared if declared is not None else num_classes

    def _check_shape(self, shape: tuple[int, ...], what: str) -> None:
        if any(d is not None and d != s for d, s in zip(self.input_shape, shape)):
            c, h, w = shape
            raise ValueError(
                f"{self.path.name} takes images of shape {_fmt(self.input_shape)} (C, H, W) but {what} {tuple(shape)}; "
                f"use the model trained on the protected dataset, or export it for {c} x {h} x {w} images "
                f"(ubwlib.onnx_model.export_onnx(model, {tuple(shape)}, path))")

    def __repr__(self) -> str:
        return (f"OnnxPredictor({str(self.path)!r}, input={_fmt(self.input_shape)}, classes={self.num_classes}, "
                f"outputs={self.outputs!r})")

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities (float32 numpy ``N x K``) of uint8 images ``N x C x H x W`` (float images are
        taken as already in ``[0, 1]``)."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        x = np.asarray(images)
        if x.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {x.shape}")
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / np.float32(255.0)
        elif np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32, copy=False)
        else:
            raise TypeError(f"images must be uint8 (0..255) or float in [0, 1], got {x.dtype}")
        self._check_shape(tuple(int(v) for v in x.shape[1:]), "the images given are")
        k = self.num_classes
        if len(x) == 0:
            return np.zeros((0, k or 0), dtype=np.float32)
        out = []
        for start in range(0, len(x), self.batch_size):
            batch = np.ascontiguousarray(x[start : start + self.batch_size])
            scores = self._session.run([self.output_name], {self.input_name: batch})[0]
            scores = np.asarray(scores)
            if scores.ndim != 2 or scores.shape[0] != len(batch) or (k is not None and scores.shape[1] != k):
                raise ValueError(
                    f"{self.path.name} returned shape {scores.shape} for {len(batch)} images; expected "
                    f"({len(batch)}, {k if k is not None else 'K'}): one row of class scores per image")
            out.append(scores)
        scores = np.concatenate(out).astype(np.float64)
        if self.outputs == "probabilities":
            return scores.astype(np.float32)
        scores -= scores.max(axis=1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=1, keepdims=True)
        return scores.astype(np.float32)


def onnx_predictor(path: str | Path, *, image_shape: Sequence[int] | None = None, num_classes: int | None = None,
                   batch_size: int = 256, outputs: str = "logits", threads: int | None = None) -> OnnxPredictor:
    """A predictor ``images_uint8 -> probabilities`` (float32 numpy ``N x K``) for an ONNX file, to pass to
    :func:`ubwlib.verify.verify` as the suspicious model.

    The file is run by onnxruntime's CPU provider (``threads``: its intra-op threads, default onnxruntime's),
    ``batch_size`` images at a time; uint8 images are divided by 255. ``outputs="logits"`` (default): the
    softmax of the first output is returned; ``"probabilities"``: the output is returned as it is (for a model
    that ends with a softmax; :func:`~ubwlib.verify.verify` checks that the rows sum to 1).

    Checks when loading, each a ``ValueError`` that names what was found and what was expected: the model's
    declared input ``(C, H, W)`` against ``image_shape`` (pass the key's ``key.image_shape``), its declared
    output width against ``num_classes`` (``key.num_classes``), one float32 4-d input. A missing file raises
    ``FileNotFoundError``, a file that is not an ONNX model ``ValueError``. Dynamic axes are checked on each call.
    """
    return OnnxPredictor(path, image_shape=image_shape, num_classes=num_classes, batch_size=batch_size,
                         outputs=outputs, threads=threads)
