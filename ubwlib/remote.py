"""Black-box ownership verification over HTTP: the ``ubw-predict/1`` protocol and its client.

The dataset owner can query the suspicious model only through an HTTP endpoint. :class:`HTTPPredictor` turns
such an endpoint into the ``predict_proba`` callable that :func:`ubwlib.verify.verify` takes;
:mod:`ubwlib.serve` serves a torch model under the same protocol (to test the pipeline, or to let a third party
expose its model without handing over the weights).

>>> with HTTPPredictor("http://127.0.0.1:8000", max_queries=5000) as suspect:
...     result = verify(suspect, test_set, key)
...     print(result.verdict, suspect.queries)

Protocol ``ubw-predict/1``
--------------------------
``{url}`` is the endpoint's base URL (e.g. ``http://host:8000`` or ``https://host/models/x``); all bodies are
JSON (UTF-8, ``Content-Type: application/json``).

``GET {url}/info`` -- what the endpoint serves (servers must answer it; clients need not call it)::

    {"protocol": "ubw-predict/1", "num_classes": K, "image_shape": [C, H, W],
     "outputs": "probabilities" | "labels", "max_batch": B}

``K >= 2`` classes; images are ``C x H x W``; ``outputs`` says what ``/predict`` returns; a request may hold
at most ``B >= 1`` images.

``POST {url}/predict`` -- classify ``N`` images. Request::

    {"protocol": "ubw-predict/1", "images": "<base64>", "shape": [N, C, H, W], "dtype": "uint8"}

``images`` is a *string*: the standard base64 (RFC 4648 section 4, alphabet ``A-Z a-z 0-9 + /`` with ``=``
padding, no line breaks) of the ``N*C*H*W`` raw pixel bytes, one byte per value (0..255), in C order (row-major:
image, then channel, then row, then column -- ``numpy.ascontiguousarray(x).tobytes()`` of an ``N x C x H x W``
uint8 array). This is about 1.33 bytes per pixel, far more compact than a JSON list of numbers. The pixels are
the images as stored (0..255, not normalized); the server applies its model's own preprocessing. ``N >= 0``,
``N <= max_batch`` and ``[C, H, W]`` must equal ``image_shape``. Response (``200``), for
``outputs = "probabilities"``::

    {"probabilities": [[p_0, ..., p_{K-1}], ...]}       # N rows of K floats, each >= 0, summing to 1

the class probabilities (e.g. the softmax of the logits), row ``i`` for image ``i``; or, for a label-only
endpoint (``outputs = "labels"``)::

    {"labels": [y_0, ..., y_{N-1}]}                     # N ints in [0, K)

the predicted class of each image.

Errors: any non-2xx status with the body ``{"error": "<a human-readable message>"}``. ``400``: a malformed
request (not JSON, wrong protocol string, dtype, shape or byte count); ``413``: more than ``max_batch`` images;
``404``: an unknown path; ``429``: rate limited; ``5xx``: the server failed. Clients retry ``429`` and ``5xx``
(and connection failures and timeouts), never the other ``4xx``.
"""

from __future__ import annotations

import base64
import numbers
import time
from typing import Any, Callable

import numpy as np
import torch

try:
    import httpx
except ImportError as exc:  # pragma: no cover - the owner extra is missing
    raise ImportError("ubwlib.remote needs httpx: pip install 'ubwlib[owner]' (or pip install httpx)") from exc

__all__ = ["PROTOCOL", "HTTPPredictor", "RemoteModelError", "QueryBudgetExceeded", "encode_images"]

#: The protocol string sent with every request and expected from ``GET /info``.
PROTOCOL = "ubw-predict/1"

#: Tolerance on ``|sum(row) - 1|`` and on negative probabilities (that of :mod:`ubwlib.verify`).
_PROB_ATOL = 1e-3


class RemoteModelError(RuntimeError):
    """The remote model could not be queried, or answered something that is not a valid ``ubw-predict/1``
    response. The message names the URL, what went wrong and what to check."""


class QueryBudgetExceeded(RuntimeError):
    """Sending the next request would exceed the predictor's ``max_queries`` (that request is not sent)."""


def _as_uint8_images(images: Any) -> torch.Tensor:
    """``images`` as a contiguous uint8 CPU tensor N x C x H x W (a torch tensor or a numpy array)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a uint8 torch tensor (or numpy array) N x C x H x W, got "
                        f"{type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (pixel values 0..255, as ImageDataset stores them), got "
                        f"{images.dtype}; the protocol sends raw uint8 pixels")
    if images.dim() != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
    return images.detach().cpu().contiguous()


def encode_images(images: Any) -> dict:
    """The ``POST /predict`` request body for uint8 images N x C x H x W (see the module docstring)."""
    x = _as_uint8_images(images)
    return {
        "protocol": PROTOCOL,
        "images": base64.b64encode(x.numpy().tobytes()).decode("ascii"),
        "shape": list(x.shape),
        "dtype": "uint8",
    }


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _server_message(response: httpx.Response) -> str | None:
    """The ``error`` field of an error response, if its body is such JSON."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"][:500]  # a long traceback would drown the message
    return None


def _status_hint(status: int, location: str | None = None) -> str:
    if 300 <= status < 400:
        return (f"the server redirects to {location or 'another URL'}; use the final URL (e.g. https:// instead of "
                "http://), redirects are not followed")
    if status == 404:
        return "check the URL: it must be the base URL under which the server answers POST /predict and GET /info"
    if status == 405:
        return "check the URL: the server does not accept this method there (POST /predict, GET /info)"
    if status in (401, 403):
        return ("the endpoint requires authentication: pass client=httpx.Client(headers=...) with your "
                "credentials")
    if status == 413:
        return "lower batch_size to the server's max_batch (GET /info)"
    if status == 429:
        return "the server rate-limits requests: raise retries or backoff, or query later"
    if status >= 500:
        return "the server failed: check its logs, or raise retries/backoff if it is overloaded"
    return ("the server rejected the request: check that the images match its image_shape (GET /info) and that "
            f"it speaks {PROTOCOL}")


class HTTPPredictor:
    """A remote model as a black box ``images -> probabilities``, over the ``ubw-predict/1`` protocol.

    ``url``: the endpoint's base URL (``http://`` or ``https://``; requests go to ``{url}/predict`` and
    ``{url}/info``). ``batch_size``: images per request (at most the server's ``max_batch``). ``timeout``:
    seconds per request. ``retries``: how often a failed request is sent again -- on connection failures,
    timeouts and HTTP 429/5xx, never on other 4xx -- after sleeping ``backoff * 2**attempt`` seconds
    (``attempt = 0, 1, ...``) with ``sleep``. ``max_queries``: a budget of images sent (None: no limit).
    ``num_classes``: the number of classes K, to check every answer against (None: the first answer's width
    for probabilities; ``GET /info`` for labels). ``client``: an ``httpx.Client`` to send the requests with
    (e.g. with authentication headers or a mock transport); it is not closed by :meth:`close`. Otherwise the
    predictor opens its own, closed by :meth:`close` or at the end of a ``with`` block.

    ``queries`` counts the images sent, every attempt included (a request that failed to connect was not
    sent and is not counted); a request that would take it over ``max_queries`` raises
    :class:`QueryBudgetExceeded` before it is sent (a call whose images alone exceed what is left sends nothing).
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 64,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_queries: int | None = None,
        num_classes: int | None = None,
        client: httpx.Client | None = None,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http:// or https:// URL (the endpoint's base URL), got {url!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not _is_int(retries) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not isinstance(backoff, numbers.Real) or isinstance(backoff, bool) or not backoff >= 0:
            raise ValueError(f"backoff must be a number of seconds >= 0, got {backoff!r}")
        if max_queries is not None and (not _is_int(max_queries) or max_queries < 0):
            raise ValueError(f"max_queries must be an int >= 0 or None, got {max_queries!r}")
        if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if client is not None and not isinstance(client, httpx.Client):
            raise TypeError(f"client must be an httpx.Client, got {type(client).__name__}")
        if not callable(sleep):
            raise TypeError("sleep must be a callable taking seconds")
        self.url = url.rstrip("/")
        self.batch_size = int(batch_size)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_queries = None if max_queries is None else int(max_queries)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.queries = 0
        self._sleep = sleep
        self._owns_client = client is None
        self._client = httpx.Client(timeout=self.timeout) if client is None else client
        self._info: dict | None = None

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the predictor's own HTTP client (a ``client`` passed in is left open)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> HTTPPredictor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"HTTPPredictor({self.url!r}, batch_size={self.batch_size}, queries={self.queries}, "
                f"max_queries={self.max_queries})")

    # ------------------------------------------------------------------ public queries
    def __call__(self, images: Any) -> np.ndarray:
        """Class probabilities (float64 numpy array N x K) of the remote model on uint8 images N x C x H x W,
        sent ``batch_size`` at a time. Raises :class:`RemoteModelError` if the endpoint is label-only."""
        x = _as_uint8_images(images)
        self._check_budget(len(x))
        out = [self._probabilities(x[s : s + self.batch_size]) for s in range(0, len(x), self.batch_size)]
        if not out:
            return np.zeros((0, self.num_classes or 0))
        return np.concatenate(out)

    def labels(self, images: Any) -> np.ndarray:
        """Predicted labels (int64 numpy array N) of the remote model on uint8 images N x C x H x W, for the
        label-only test. A label-only endpoint's ``labels`` are checked to be ints in ``[0, K)`` (K from
        ``num_classes``, else from ``GET /info``); from a probability endpoint, the argmax of each row."""
        x = _as_uint8_images(images)
        self._check_budget(len(x))
        out = [self._labels(x[s : s + self.batch_size]) for s in range(0, len(x), self.batch_size)]
        if not out:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(out)

    def info(self) -> dict:
        """The endpoint's ``GET /info`` (validated): protocol, num_classes, image_shape, outputs, max_batch."""
        body = self._request("GET", "/info")
        where = f"GET {self.url}/info"
        if not isinstance(body, dict):
            raise RemoteModelError(f"{where} returned {type(body).__name__}, not a JSON object; the server does "
                                   f"not speak {PROTOCOL}")
        missing = [k for k in ("protocol", "num_classes", "image_shape", "outputs", "max_batch") if k not in body]
        if missing:
            raise RemoteModelError(f"{where} lacks {', '.join(missing)}; the server does not speak {PROTOCOL} "
                                   "(see ubwlib.remote's docstring)")
        if body["protocol"] != PROTOCOL:
            raise RemoteModelError(f"{where} speaks protocol {body['protocol']!r}, this client {PROTOCOL!r}")
        k, shape, outputs, max_batch = body["num_classes"], body["image_shape"], body["outputs"], body["max_batch"]
        if not _is_int(k) or k < 2:
            raise RemoteModelError(f"{where}: num_classes must be an int >= 2, got {k!r}")
        if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(v) and v >= 1 for v in shape):
            raise RemoteModelError(f"{where}: image_shape must be [C, H, W] (3 positive ints), got {shape!r}")
        if outputs not in ("probabilities", "labels"):
            raise RemoteModelError(f"{where}: outputs must be 'probabilities' or 'labels', got {outputs!r}")
        if not _is_int(max_batch) or max_batch < 1:
            raise RemoteModelError(f"{where}: max_batch must be a positive int, got {max_batch!r}")
        if self.num_classes is not None and k != self.num_classes:
            raise RemoteModelError(f"{where} serves {k} classes, but this predictor expects num_classes = "
                                   f"{self.num_classes}; check the URL or num_classes")
        self._info = dict(body)
        return dict(body)

    # ------------------------------------------------------------------ one batch
    def _check_budget(self, n: int) -> None:
        if self.max_queries is not None and self.queries + n > self.max_queries:
            raise QueryBudgetExceeded(
                f"sending {n} more images to {self.url} would make {self.queries + n} queries, over the budget "
                f"max_queries = {self.max_queries} ({self.queries} sent so far); the request was not sent. Raise "
                "max_queries, or query fewer images (e.g. a smaller m or test set)")

    def _predict(self, x: torch.Tensor) -> dict:
        body = self._request("POST", "/predict", encode_images(x), n_images=len(x))
        if not isinstance(body, dict):
            raise RemoteModelError(f"POST {self.url}/predict returned {type(body).__name__}, not a JSON object; "
                                   f"the server does not speak {PROTOCOL} (see ubwlib.remote's docstring)")
        return body

    def _probabilities(self, x: torch.Tensor) -> np.ndarray:
        body = self._predict(x)
        if "probabilities" not in body and "labels" in body:
            raise RemoteModelError(
                f"POST {self.url}/predict returned labels, not probabilities: the endpoint is label-only. The "
                "probability test cannot run on it; use the label-only test (ubwlib.verify.verify_labels with "
                "HTTPPredictor.labels)")
        return self._check_probabilities(body, len(x))

    def _check_probabilities(self, body: dict, n: int) -> np.ndarray:
        """The validated ``probabilities`` of a ``/predict`` answer for ``n`` images (float64, n x K)."""
        where = f"POST {self.url}/predict"
        if "probabilities" not in body:
            raise RemoteModelError(f"{where} returned no 'probabilities' (keys: {sorted(body)}); the server does "
                                   f"not speak {PROTOCOL} (see ubwlib.remote's docstring)")
        rows = body["probabilities"]
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise RemoteModelError(f"{where}: 'probabilities' must be a list of rows (lists of numbers), got "
                                   f"{rows!r:.80}; fix the server's response")
        if len(rows) != n:
            raise RemoteModelError(f"{where} returned {len(rows)} rows of probabilities for {n} images; the "
                                   "server must return one row per image, in order")
        widths = sorted({len(r) for r in rows})
        if len(widths) > 1:
            raise RemoteModelError(f"{where} returned rows of different lengths {widths}; every row must hold "
                                   "the K class probabilities")
        k = widths[0] if widths else (self.num_classes or 0)
        if self.num_classes is not None and k != self.num_classes:
            raise RemoteModelError(f"{where} returned {k} probabilities per image, expected {self.num_classes} "
                                   "(the classes of the dataset, or of its earlier answers); check that the URL "
                                   "serves a model of this dataset")
        if n and k < 2:
            raise RemoteModelError(f"{where} returned {k} probabilities per image; a classifier has >= 2 classes")
        if not all(_is_number(v) for r in rows for v in r):
            raise RemoteModelError(f"{where}: probabilities must be JSON numbers (no strings, booleans or null); "
                                   "fix the server's response")
        arr = np.array(rows, dtype=np.float64).reshape(n, k)
        if not np.isfinite(arr).all():
            raise RemoteModelError(f"{where} returned non-finite probabilities (NaN or infinity); the remote "
                                   "model is broken on these images (check its weights and preprocessing)")
        if n:
            if arr.min() < -_PROB_ATOL:
                raise RemoteModelError(
                    f"{where} returned negative values (down to {arr.min():.4g}), not probabilities; if these "
                    "are logits, the server must answer softmax(logits)")
            sums = arr.sum(1)
            if np.abs(sums - 1).max() > _PROB_ATOL:
                raise RemoteModelError(
                    f"{where} returned rows summing to {sums.min():.4g}..{sums.max():.4g}, not 1 (tolerance "
                    f"{_PROB_ATOL}); if these are logits or scores, the server must answer softmax(logits)")
            if self.num_classes is None:
                self.num_classes = k  # every later answer must have the same width
        return np.clip(arr, 0.0, None)

    def _labels(self, x: torch.Tensor) -> np.ndarray:
        body = self._predict(x)
        where = f"POST {self.url}/predict"
        if "labels" not in body:
            if "probabilities" in body:
                return self._check_probabilities(body, len(x)).argmax(1).astype(np.int64)
            raise RemoteModelError(f"{where} returned no 'labels' (keys: {sorted(body)}); the server does not "
                                   f"speak {PROTOCOL} (see ubwlib.remote's docstring)")
        labels = body["labels"]
        if not isinstance(labels, list) or not all(_is_int(v) for v in labels):
            raise RemoteModelError(f"{where}: 'labels' must be a list of ints (class indices), got "
                                   f"{labels!r:.80}; fix the server's response")
        if len(labels) != len(x):
            raise RemoteModelError(f"{where} returned {len(labels)} labels for {len(x)} images; the server must "
                                   "return one label per image, in order")
        k = self._num_classes_for_labels()
        bad = [v for v in labels if not 0 <= v < k]
        if bad:
            raise RemoteModelError(f"{where} returned labels outside [0, {k}) (e.g. {bad[0]}); check that the URL "
                                   "serves a model of this dataset")
        return np.asarray(labels, dtype=np.int64).reshape(len(x))

    def _num_classes_for_labels(self) -> int:
        if self.num_classes is None:
            try:
                self.num_classes = int(self.info()["num_classes"])
            except RemoteModelError as exc:
                raise RemoteModelError(f"cannot check the labels of {self.url} without the number of classes: "
                                       f"GET /info failed ({exc}); pass num_classes=K") from None
        return self.num_classes

    # ------------------------------------------------------------------ HTTP with retries
    def _request(self, method: str, path: str, payload: dict | None = None, n_images: int = 0) -> Any:
        """Send one request (retrying as documented) and return its parsed JSON body."""
        url = self.url + path
        where = f"{method} {url}"
        attempts = self.retries + 1
        failure = ""
        for attempt in range(attempts):
            if attempt:
                self._sleep(self.backoff * 2 ** (attempt - 1))
            self._check_budget(n_images)
            try:
                response = self._client.request(method, url, json=payload, timeout=self.timeout)
            except httpx.ConnectError as exc:
                failure = (f"could not connect ({type(exc).__name__}: {exc}); check that the server is running and "
                           "reachable at this URL (host, port, http vs https, firewall)")
                continue
            except httpx.TimeoutException as exc:
                self.queries += n_images
                failure = (f"timed out after {self.timeout:g} s ({type(exc).__name__}); raise timeout or lower "
                           "batch_size, or check that the server is not overloaded")
                continue
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                self.queries += n_images
                failure = (f"the connection failed ({type(exc).__name__}: {exc}); check that the server is "
                           "running and healthy")
                continue
            except httpx.HTTPError as exc:
                raise RemoteModelError(f"{where} failed ({type(exc).__name__}: {exc}); check the URL") from None
            self.queries += n_images
            status = response.status_code
            if 200 <= status < 300:
                try:
                    return response.json()
                except ValueError:
                    snippet = response.text[:80]
                    raise RemoteModelError(
                        f"{where} answered HTTP {status} with a body that is not JSON ({snippet!r}); check that "
                        f"the URL is a {PROTOCOL} endpoint (see ubwlib.remote's docstring)") from None
            message = _server_message(response)
            failure = (f"HTTP {status}" + (f" (server error: {message!r})" if message else "")
                       + f"; {_status_hint(status, response.headers.get('location'))}")
            if status != 429 and status < 500:
                raise RemoteModelError(f"{where} failed: {failure}")
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        raise RemoteModelError(f"{where} failed after {tries}: {failure}")

