"""Serve a torch model over HTTP with the ``ubw-predict/1`` protocol (see :mod:`ubwlib.remote`).

:func:`make_app` wraps a model in a Starlette ASGI app answering ``GET /info`` and ``POST /predict``;
:func:`serve` runs an app with uvicorn; :func:`load_weights` builds a model from a state_dict file. From the
shell::

    python -m ubwlib.serve WEIGHTS --arch NAME [--width W] --classes K --shape C H W [--labels-only]
                           [--max-batch B] [--device DEV] [--host H] [--port P]

serves the state_dict ``WEIGHTS`` (``torch.save(model.state_dict(), path)``, read with ``weights_only=True``)
as a ``NAME`` model of ``K`` classes on ``C x H x W`` uint8 images, at ``http://H:P`` (default
``127.0.0.1:8000``, this machine only; ``--host 0.0.0.0`` listens on every interface). The app has no
authentication: put it behind a reverse proxy to expose it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import math
import sys
import threading
from typing import Any, Sequence

import torch
from torch import nn

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - the owner extra is missing
    raise ImportError("ubwlib.serve needs starlette and uvicorn: pip install 'ubwlib[owner]'") from exc

from .models import load_weights
from .remote import PROTOCOL
from .train import predict_proba

__all__ = ["make_app", "serve", "main"]

#: The protocol string of :mod:`ubwlib.remote` (kept here too so that the server does not need httpx).

_log = logging.getLogger("ubwlib.serve")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def make_app(
    model: nn.Module,
    *,
    num_classes: int,
    image_shape: Sequence[int],
    outputs: str = "probabilities",
    max_batch: int = 1024,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> Starlette:
    """A Starlette app serving ``model`` with the ``ubw-predict/1`` protocol.

    ``GET /info`` describes the endpoint; ``POST /predict`` answers the probabilities of
    :func:`ubwlib.train.predict_proba` (the softmax of the model's logits, eval mode, on ``device``; default:
    where the model's parameters are; ``precision``: ``fp32`` by default, so that every machine answers the same
    numbers, or ``auto``), or with ``outputs="labels"`` only their argmax. ``image_shape`` is
    ``(C, H, W)`` of the uint8 images accepted; a request holds at most ``max_batch`` images. Malformed requests
    get ``400`` (``413`` when over ``max_batch``) with ``{"error": ...}``; a model failure gets ``500``.
    Requests are answered one at a time (the model runs in a worker thread, behind a lock).

    The model is checked once, on one black image: it must output ``num_classes`` logits.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    shape = tuple(image_shape) if isinstance(image_shape, (list, tuple, torch.Size)) else None
    if shape is None or len(shape) != 3 or not all(_is_int(v) and v >= 1 for v in shape):
        raise ValueError(f"image_shape must be (C, H, W), three positive ints, got {image_shape!r}")
    if outputs not in ("probabilities", "labels"):
        raise ValueError(f"outputs must be 'probabilities' or 'labels', got {outputs!r}")
    if not _is_int(max_batch) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
    c, h, w = shape
    pixels = c * h * w
    # the largest request: base64 of max_batch images plus the JSON around it
    max_body = 4 * math.ceil(max_batch * pixels / 3) + 4096

    probe = predict_proba(model, torch.zeros(1, *shape, dtype=torch.uint8), device=device, precision=precision)
    if tuple(probe.shape) != (1, num_classes):
        raise ValueError(f"the model outputs {probe.shape[1]} classes on a {c}x{h}x{w} image, but num_classes = "
                         f"{num_classes}; check the model (architecture, weights) and --classes")

    lock = threading.Lock()
    info_body = {"protocol": PROTOCOL, "num_classes": num_classes, "image_shape": list(shape), "outputs": outputs,
                 "max_batch": max_batch}

    def run_model(images: torch.Tensor) -> dict:
        if len(images) == 0:
            return {outputs: []}
        with lock:
            probs = predict_proba(model, images, batch_size=max_batch, device=device, precision=precision)
        if outputs == "labels":
            return {"labels": probs.argmax(1).tolist()}
        if not bool(torch.isfinite(probs).all()):
            raise ValueError("the model produced non-finite probabilities (NaN or infinity)")
        return {"probabilities": probs.tolist()}

    def parse(body: bytes) -> torch.Tensor:
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _BadRequest(400, "the request body is not JSON; send "
                                   '{"protocol": "ubw-predict/1", "images": "<base64>", "shape": [N, C, H, W], '
                                   '"dtype": "uint8"}') from None
        if not isinstance(req, dict):
            raise _BadRequest(400, f"the request must be a JSON object, got {type(req).__name__}")
        if req.get("protocol") != PROTOCOL:
            raise _BadRequest(400, f"unsupported protocol {req.get('protocol')!r}; this server speaks {PROTOCOL!r}")
        if req.get("dtype") != "uint8":
            raise _BadRequest(400, f"dtype must be 'uint8', got {req.get('dtype')!r}")
        req_shape = req.get("shape")
        if (not isinstance(req_shape, list) or len(req_shape) != 4 or not all(_is_int(v) for v in req_shape)
                or req_shape[0] < 0):
            raise _BadRequest(400, f"shape must be [N, C, H, W] (4 ints, N >= 0), got {req_shape!r:.80}")
        n = req_shape[0]
        if tuple(req_shape[1:]) != shape:
            raise _BadRequest(400, f"images of shape {req_shape[1:]} sent, but this model takes {list(shape)} "
                                   "(C, H, W; see GET /info)")
        if n > max_batch:
            raise _BadRequest(413, f"{n} images in one request, more than max_batch = {max_batch}; send smaller "
                                   "batches")
        data = req.get("images")
        if not isinstance(data, str):
            raise _BadRequest(400, f"images must be a base64 string of the raw uint8 bytes, got "
                                   f"{type(data).__name__}")
        try:
            raw = base64.b64decode(data, validate=True)
        except (ValueError, binascii.Error):
            raise _BadRequest(400, "images is not valid base64 (standard alphabet with '=' padding)") from None
        if len(raw) != n * pixels:
            raise _BadRequest(400, f"images hold {len(raw)} bytes, but shape {req_shape} needs {n * pixels} "
                                   "(one byte per value, C order)")
        if n == 0:
            return torch.zeros(0, c, h, w, dtype=torch.uint8)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(n, c, h, w)

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(info_body)

    async def predict(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            return _error(413, f"request body of {declared} bytes is larger than max_batch = {max_batch} images "
                               "can be; send smaller batches")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                return _error(413, f"request body larger than max_batch = {max_batch} images can be; send smaller "
                                   "batches")
            chunks.append(chunk)
        try:
            images = parse(b"".join(chunks))
        except _BadRequest as exc:
            return _error(exc.status, exc.message)
        try:
            answer = await run_in_threadpool(run_model, images)
        except Exception as exc:  # noqa: BLE001 - any model failure is the server's (500), logged
            _log.exception("model failed on a batch of %d images", len(images))
            return _error(500, f"the model failed: {type(exc).__name__}: {exc}")
        return JSONResponse(answer)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        hint = {404: "; this server answers GET /info and POST /predict",
                405: "; use GET /info and POST /predict"}.get(exc.status_code, "")
        return _error(exc.status_code, f"{exc.detail}{hint}")

    return Starlette(
        routes=[Route("/info", info, methods=["GET"]), Route("/predict", predict, methods=["POST"])],
        exception_handlers={HTTPException: http_error},
    )


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Run the ASGI ``app`` with uvicorn at ``http://host:port`` until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


def build_parser() -> argparse.ArgumentParser:
    from .models import MODEL_NAMES

    ap = argparse.ArgumentParser(prog="python -m ubwlib.serve",
                                 description=f"Serve a model's state_dict over HTTP ({PROTOCOL}, see ubwlib.remote).")
    ap.add_argument("weights", help="the model's state_dict (torch.save(model.state_dict(), path)); read with "
                                    "weights_only=True")
    ap.add_argument("--arch", required=True, choices=sorted(MODEL_NAMES), help="the model's architecture")
    ap.add_argument("--width", type=float, default=1.0, help="width multiplier (default: %(default)s)")
    ap.add_argument("--classes", type=int, required=True, help="number of classes K")
    ap.add_argument("--shape", type=int, nargs=3, required=True, metavar=("C", "H", "W"),
                    help="image shape (channels, height, width)")
    ap.add_argument("--labels-only", action="store_true", help="answer predicted labels only, no probabilities")
    ap.add_argument("--max-batch", type=int, default=1024, help="most images per request (default: %(default)s)")
    ap.add_argument("--device", default=None, help="torch device (default: cpu)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    ap.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_weights(args.weights, args.arch, args.width, args.classes, args.shape[0])
        app = make_app(model, num_classes=args.classes, image_shape=tuple(args.shape),
                       outputs="labels" if args.labels_only else "probabilities", max_batch=args.max_batch,
                       device=args.device)
    except (ValueError, TypeError) as exc:
        print(f"ubw serve: {exc}", file=sys.stderr)
        return 1
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
