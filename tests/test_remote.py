"""Tests of black-box verification over HTTP: the ``ubw-predict/1`` client (ubwlib.remote) and server (ubwlib.serve).

A BadNets-watermarked SmallCNN (1x12x12 blob images, 4 classes, as in test_verify.py) is served by a real
``python -m ubwlib.serve`` subprocess on localhost: its probabilities over HTTP must equal the in-process ones,
and ``verify`` over HTTP must give exactly the in-process result. The label-only mode is served by uvicorn in a
thread (real HTTP, without a second torch import). The client's error paths run against fake servers
(``httpx.MockTransport``) with a recorded ``sleep``; the server's request checks run in process through
Starlette's ``TestClient``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

uvicorn = pytest.importorskip("uvicorn")

with warnings.catch_warnings():  # starlette 1.x prefers httpx2 for its TestClient and warns when it uses httpx
    warnings.filterwarnings("ignore", message=r".*httpx2")
    from starlette.testclient import TestClient  # noqa: E402

from ubwlib.data import ImageDataset  # noqa: E402
from ubwlib.models import build_model  # noqa: E402
from ubwlib.remote import (  # noqa: E402
    PROTOCOL,
    HTTPPredictor,
    QueryBudgetExceeded,
    RemoteModelError,
    encode_images,
)
from ubwlib.models import load_weights
from ubwlib.serve import main, make_app  # noqa: E402
from ubwlib.train import TrainConfig, predict_proba, train  # noqa: E402
from ubwlib.verify import model_predictor, verify, verify_labels  # noqa: E402
from ubwlib.watermarks import get_watermark  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ROOT = Path(__file__).resolve().parents[1]
K = 4
SHAPE = (1, 12, 12)
FAKE_URL = "http://ubw.test/model"


def blobs(n: int, seed: int, name: str) -> ImageDataset:
    """n images (balanced classes, shuffled): dark noise 0..59 plus the class's bright 4x3 blob (test_verify.py)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % K)[torch.randperm(n, generator=g)]
    images = torch.randint(0, 60, (n, *SHAPE), generator=g, dtype=torch.uint8)
    for c in range(K):
        images[labels == c, :, 1:5, 3 * c : 3 * c + 3] = 230
    return ImageDataset(images, labels, ("a", "b", "c", "d"), name)


@pytest.fixture(scope="module")
def test_set():
    return blobs(200, 1, "blobs/test")


@pytest.fixture(scope="module")
def marked():
    """A BadNets-watermarked SmallCNN (gamma = 0.2, 4 epochs: 100% accurate, Delta P ~ 1) and its key."""
    released = get_watermark("badnets", poisoning_rate=0.2).watermark(blobs(400, 0, "blobs/train"), seed=0)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, schedule="onecycle", precision="fp32", flip=False)
    model = train(build_model("smallcnn", K, 1, 0.25, seed=0), released.dataset, cfg, progress=False).model
    return model.eval(), released.key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(weights: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ubwlib.serve", str(weights), "--arch", "smallcnn", "--width", "0.25",
           "--classes", str(K), "--shape", *map(str, SHAPE), "--port", str(port), "--log-level", "warning", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _wait(proc: subprocess.Popen, url: str, log: Path, deadline_s: float = 90.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/info", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"the server at {url} did not answer GET /info within {deadline_s} s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def server(marked, tmp_path_factory):
    """A real ``python -m ubwlib.serve`` subprocess serving the watermarked model's probabilities: its URL."""
    folder = tmp_path_factory.mktemp("serve")
    weights, log = folder / "marked.pt", folder / "server.log"
    torch.save(marked[0].state_dict(), weights)
    proc, url = _start(weights, log)
    try:
        _wait(proc, url, log)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def label_server(marked):
    """The watermarked model served label-only by uvicorn in a thread of this process (real HTTP on a real
    port; no second torch import): its URL."""
    config = uvicorn.Config(make_app(marked[0], num_classes=K, image_shape=SHAPE, outputs="labels"),
                            host="127.0.0.1", port=free_port(), log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("the in-process uvicorn server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        srv.should_exit = True
        thread.join(10)


# --------------------------------------------------------------------------- real servers over HTTP
def test_info_over_http(server, label_server):
    with HTTPPredictor(server) as remote:
        assert remote.info() == {"protocol": PROTOCOL, "num_classes": K, "image_shape": list(SHAPE),
                                 "outputs": "probabilities", "max_batch": 1024}
        assert remote.queries == 0
    with HTTPPredictor(label_server + "/") as remote:  # a trailing slash is fine
        assert remote.info()["outputs"] == "labels"


def test_probabilities_over_http_equal_in_process(server, marked, test_set):
    model, _ = marked
    x = test_set.images[:50]
    with HTTPPredictor(server, batch_size=16) as remote:
        out = remote(x)
        assert out.dtype == np.float64 and out.shape == (50, K)
        np.testing.assert_allclose(out, predict_proba(model, x, precision="fp32").double().numpy(), rtol=0, atol=1e-7)
        assert remote.queries == 50  # 4 requests: 16 + 16 + 16 + 2
        np.testing.assert_array_equal(remote(x.numpy()), out)  # numpy images alike
        assert remote(x[:0]).shape == (0, K)
        assert remote.queries == 100
        np.testing.assert_array_equal(remote.labels(x), out.argmax(1))  # labels from a probability endpoint


def test_verify_over_http_equals_verify_in_process(server, marked, test_set):
    model, key = marked
    local = verify(model_predictor(model, precision="fp32"), test_set, key, m=30, seed=3)
    with HTTPPredictor(server, batch_size=1024, max_queries=400) as remote:  # the batches verify sends
        over_http = verify(remote, test_set, key, m=30, seed=3)
        assert remote.queries == over_http.queries == local.queries
    assert over_http.watermarked and over_http.delta_p > 0.5
    assert over_http.p_value == local.p_value and over_http.statistic == local.statistic
    assert over_http.delta_p == local.delta_p
    assert torch.equal(over_http.indices, local.indices)
    np.testing.assert_array_equal(over_http.p_benign, local.p_benign)
    np.testing.assert_array_equal(over_http.p_triggered, local.p_triggered)


def test_small_batches_give_the_same_result(server, marked, test_set):
    model, key = marked
    local = verify(model_predictor(model, precision="fp32"), test_set, key, m=30, seed=3, batch_size=20)
    with HTTPPredictor(server, batch_size=7) as remote:
        r = verify(remote, test_set, key, m=30, seed=3, batch_size=20)
        assert remote.queries == r.queries
    assert torch.equal(r.indices, local.indices) and r.watermarked
    assert r.p_value == pytest.approx(local.p_value, rel=1e-6, abs=1e-300)


def test_query_budget_over_http(server, test_set, marked):
    x = test_set.images[:16]
    with HTTPPredictor(server, batch_size=8, max_queries=20) as remote:
        remote(x)
        assert remote.queries == 16
        with pytest.raises(QueryBudgetExceeded, match=r"max_queries = 20.*16 sent") as exc:
            remote(x[:8])
        assert isinstance(exc.value, RuntimeError)
        assert remote.queries == 16  # nothing was sent
        remote(x[:4])
        assert remote.queries == 20
    with HTTPPredictor(server, max_queries=40) as remote, pytest.raises(QueryBudgetExceeded, match="m or test set"):
        verify(remote, test_set, marked[1], m=30)  # 30 benign + 30 triggered images


def test_label_only_server(label_server, marked, test_set):
    model, key = marked
    x = test_set.images[:40]
    with HTTPPredictor(label_server, batch_size=16) as remote:
        labels = remote.labels(x)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, predict_proba(model, x, precision="fp32").argmax(1).numpy())
        assert remote.num_classes == K  # learned from GET /info to check the labels
        with pytest.raises(RemoteModelError, match=r"label-only.*verify_labels"):
            remote(x)
    with HTTPPredictor(label_server, batch_size=1024) as remote:
        over_http = verify_labels(remote.labels, test_set, key, m=30, seed=3)
        assert remote.queries == over_http.queries
    local = verify_labels(lambda x: predict_proba(model, x, precision="fp32").argmax(1), test_set, key, m=30, seed=3)
    assert over_http.watermarked and over_http.flips == local.flips == 30
    assert over_http.p_value == local.p_value and torch.equal(over_http.indices, local.indices)


def test_connection_refused_names_the_url():
    port = free_port()  # nothing listens there any more
    sleeps = []
    remote = HTTPPredictor(f"http://127.0.0.1:{port}", retries=2, backoff=0.01, sleep=sleeps.append)
    with pytest.raises(RemoteModelError, match=rf"127\.0\.0\.1:{port}/predict failed after 3 attempts: "
                                               r"could not connect.*server is running"):
        remote(torch.zeros(2, *SHAPE, dtype=torch.uint8))
    assert sleeps == [0.01, 0.02]
    assert remote.queries == 0  # never sent
    remote.close()


# --------------------------------------------------------------------------- the client against fake servers
def decode(request: httpx.Request) -> torch.Tensor:
    body = json.loads(request.content)
    assert body["protocol"] == PROTOCOL and body["dtype"] == "uint8"
    raw = base64.b64decode(body["images"], validate=True)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(body["shape"])


def fake_probs(images: torch.Tensor) -> list:
    """A benign fake model: softmax of the blob regions' mean brightness / 50 (as in test_verify.py)."""
    x = images.float()
    means = torch.stack([x[:, 0, 1:5, 3 * c : 3 * c + 3].mean((1, 2)) for c in range(K)], 1)
    return torch.softmax(means / 50, 1).double().tolist()


class Fake:
    """A scripted fake server: ``answers`` are used in turn (the last one repeats); each is a callable
    ``request -> httpx.Response`` (or raises). Records the requests."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        return answer(request)


def ok(request):
    return httpx.Response(200, json={"probabilities": fake_probs(decode(request))})


def status(code, error="busy"):
    return lambda request: httpx.Response(code, json={"error": error})


def body(payload):
    """A 200 answer with a fixed JSON payload (text: sent as is)."""
    if isinstance(payload, str):
        return lambda request: httpx.Response(200, text=payload, headers={"content-type": "application/json"})
    return lambda request: httpx.Response(200, json=payload)


def fake_predictor(fake, **kwargs):
    sleeps: list[float] = []
    kwargs.setdefault("sleep", sleeps.append)
    client = httpx.Client(transport=httpx.MockTransport(fake))
    return HTTPPredictor(FAKE_URL, client=client, **kwargs), sleeps


@pytest.fixture(scope="module")
def images(test_set):
    return test_set.images[:6]


def test_encode_images_is_base64_of_the_c_order_bytes():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).reshape(2, 3, 2, 2)
    enc = encode_images(x.permute(0, 1, 3, 2))  # a non-contiguous view is sent in its logical C order
    assert enc["protocol"] == PROTOCOL and enc["shape"] == [2, 3, 2, 2] and enc["dtype"] == "uint8"
    assert base64.b64decode(enc["images"]) == x.permute(0, 1, 3, 2).contiguous().numpy().tobytes()


def test_batches_and_results_with_a_fake_server(images):
    fake = Fake(ok)
    remote, sleeps = fake_predictor(fake, batch_size=4)
    out = remote(images)
    assert [decode(r).shape[0] for r in fake.requests] == [4, 2]
    assert all(str(r.url) == FAKE_URL + "/predict" and r.method == "POST" for r in fake.requests)
    np.testing.assert_array_equal(out, np.array(fake_probs(images)))
    assert remote.queries == 6 and sleeps == []


@pytest.mark.parametrize("code", [500, 503, 429])
def test_retries_with_exponential_backoff_then_success(images, code):
    fake = Fake(status(code), status(code), ok)
    remote, sleeps = fake_predictor(fake, retries=3, backoff=0.5)
    out = remote(images)
    np.testing.assert_array_equal(out, np.array(fake_probs(images)))
    assert len(fake.requests) == 3 and sleeps == [0.5, 1.0]
    assert remote.queries == 3 * len(images)  # every attempt sent the images


def test_persistent_server_error_gives_up_with_a_clear_message(images):
    fake = Fake(status(500, "CUDA out of memory"))
    remote, sleeps = fake_predictor(fake, retries=3, backoff=0.5)
    with pytest.raises(RemoteModelError, match=r"POST http://ubw\.test/model/predict failed after 4 attempts: "
                                               r"HTTP 500 \(server error: 'CUDA out of memory'\).*check its logs"):
        remote(images)
    assert len(fake.requests) == 4 and sleeps == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("code, hint", [(404, "check the URL"), (400, "image_shape"), (413, "lower batch_size"),
                                        (401, "authentication")])
def test_client_errors_are_not_retried(images, code, hint):
    fake = Fake(status(code, "nope"))
    remote, sleeps = fake_predictor(fake, retries=3)
    with pytest.raises(RemoteModelError, match=rf"model/predict failed: HTTP {code} \(server error: 'nope'\).*{hint}"):
        remote(images)
    assert len(fake.requests) == 1 and sleeps == []


def test_redirects_are_reported_not_followed(images):
    fake = Fake(lambda request: httpx.Response(308, headers={"location": "https://ubw.test/model/predict"}))
    remote, sleeps = fake_predictor(fake)
    with pytest.raises(RemoteModelError, match=r"HTTP 308; the server redirects to https://ubw\.test/model/predict"):
        remote(images)
    assert len(fake.requests) == 1 and sleeps == []


def test_error_without_json_body(images):
    fake = Fake(lambda request: httpx.Response(502, text="<html>Bad Gateway</html>"))
    remote, _ = fake_predictor(fake, retries=1, backoff=0)
    with pytest.raises(RemoteModelError, match=r"after 2 attempts: HTTP 502; the server failed"):
        remote(images)


def test_timeouts_are_retried(images):
    def slow(request):
        raise httpx.ReadTimeout("timed out", request=request)

    fake = Fake(slow, ok)
    remote, sleeps = fake_predictor(fake, retries=1, backoff=0.25, timeout=2.0)
    assert remote(images).shape == (6, K) and sleeps == [0.25]
    fake = Fake(slow)
    remote, sleeps = fake_predictor(fake, retries=2, backoff=0.25, timeout=2.0)
    with pytest.raises(RemoteModelError, match=r"failed after 3 attempts: timed out after 2 s.*raise timeout"):
        remote(images)
    assert sleeps == [0.25, 0.5] and len(fake.requests) == 3


def test_connection_errors_from_a_fake_are_retried(images):
    def refused(request):
        raise httpx.ConnectError("connection refused", request=request)

    fake = Fake(refused, refused, ok)
    remote, sleeps = fake_predictor(fake, retries=2, backoff=1)
    assert remote(images).shape == (6, K)
    assert sleeps == [1, 2] and remote.queries == 6  # the refused attempts sent nothing


def _rows(n, row):
    return [list(row) for _ in range(n)]


@pytest.mark.parametrize("payload, match", [
    ("<html>hello</html>", r"not JSON.*ubw-predict/1 endpoint"),
    ([0.25] * 4, r"returned list, not a JSON object"),
    ({"probs": []}, r"no 'probabilities' \(keys: \['probs'\]\)"),
    ({"probabilities": _rows(5, [0.25] * 4)}, r"returned 5 rows of probabilities for 6 images"),
    ({"probabilities": _rows(6, [0.5] * 2)}, r"returned 2 probabilities per image, expected 4"),
    ({"probabilities": _rows(5, [0.25] * 4) + [[1.0]]}, r"rows of different lengths \[1, 4\]"),
    ({"probabilities": _rows(6, ["0.25"] * 4)}, r"must be JSON numbers"),
    ({"probabilities": _rows(6, [0.25, None, 0.5, 0.25])}, r"must be JSON numbers"),
    ('{"probabilities": ' + json.dumps(_rows(5, [0.25] * 4))[:-1] + ', [NaN, 0.5, 0.25, 0.25]]}',
     r"non-finite probabilities"),
    ({"probabilities": _rows(6, [1.5, -0.5, 0.0, 0.0])}, r"negative values \(down to -0\.5\).*softmax"),
    ({"probabilities": _rows(6, [2.0, 1.0, 0.5, 0.1])}, r"rows summing to 3\.6\.\.3\.6, not 1.*softmax"),
    ({"labels": [0] * 6}, r"returned labels, not probabilities: the endpoint is label-only.*verify_labels"),
])
def test_invalid_answers_are_reported(images, payload, match):
    fake = Fake(body(payload))
    remote, sleeps = fake_predictor(fake, num_classes=K)
    with pytest.raises(RemoteModelError, match=r"http://ubw\.test/model/predict.*" + match):
        remote(images)
    assert len(fake.requests) == 1 and sleeps == []  # a bad answer is not retried


def test_width_is_learned_from_the_first_answer(images):
    fake = Fake(ok, body({"probabilities": _rows(6, [0.5, 0.5])}))
    remote, _ = fake_predictor(fake)
    assert remote.num_classes is None
    remote(images)
    assert remote.num_classes == K
    with pytest.raises(RemoteModelError, match="2 probabilities per image, expected 4"):
        remote(images)


def test_tiny_rounding_is_accepted_and_clipped(images):
    fake = Fake(body({"probabilities": _rows(6, [1.0004, -0.0002, -0.0002, 0.0])}))
    remote, _ = fake_predictor(fake)
    out = remote(images)
    assert out.min() == 0.0 and out[:, 0] == pytest.approx(1.0004)


def _info(**changes):
    info = {"protocol": PROTOCOL, "num_classes": K, "image_shape": list(SHAPE), "outputs": "labels",
            "max_batch": 8}
    info.update(changes)
    return info


def fake_label_server(labels, info=None):
    def answer(request):
        if request.url.path.endswith("/info"):
            return httpx.Response(200, json=_info() if info is None else info)
        return httpx.Response(200, json={"labels": labels[: decode(request).shape[0]]})

    return answer


def test_labels_with_a_fake_server(images):
    fake = Fake(fake_label_server([3, 0, 1, 2, 2, 1]))
    remote, _ = fake_predictor(fake, batch_size=4)
    labels = remote.labels(images)
    np.testing.assert_array_equal(labels, [3, 0, 1, 2, 3, 0])  # two batches, each from the first label
    assert labels.dtype == np.int64
    assert [r.url.path for r in fake.requests] == ["/model/predict", "/model/info", "/model/predict"]
    assert remote.queries == 6


@pytest.mark.parametrize("labels, match", [
    ([0, 1, 2, 3, 4, 0], r"labels outside \[0, 4\) \(e\.g\. 4\)"),
    ([0, 1, -1, 3, 2, 0], r"labels outside \[0, 4\)"),
    ([0, 1, 2.0, 3, 2, 0], r"must be a list of ints"),
    ([0, 1, True, 3, 2, 0], r"must be a list of ints"),
    ([0, 1], r"returned 2 labels for 6 images"),
])
def test_invalid_labels_are_reported(images, labels, match):
    fake = Fake(body({"labels": labels}))
    remote, _ = fake_predictor(fake, num_classes=K)
    with pytest.raises(RemoteModelError, match=match):
        remote.labels(images)


def test_labels_need_the_number_of_classes(images):
    fake = Fake(lambda r: httpx.Response(200, json={"labels": [0] * 6}) if r.url.path.endswith("predict")
                else httpx.Response(404, json={"error": "Not Found"}))
    remote, _ = fake_predictor(fake)
    with pytest.raises(RemoteModelError, match=r"without the number of classes.*HTTP 404.*pass num_classes=K"):
        remote.labels(images)


@pytest.mark.parametrize("info, match", [
    (_info(protocol="ubw-predict/2"), r"speaks protocol 'ubw-predict/2'"),
    ({"protocol": PROTOCOL}, r"lacks num_classes, image_shape, outputs, max_batch"),
    (_info(num_classes=1), r"num_classes must be an int >= 2"),
    (_info(image_shape=[12, 12]), r"image_shape must be \[C, H, W\]"),
    (_info(outputs="logits"), r"outputs must be 'probabilities' or 'labels'"),
    (_info(max_batch=0), r"max_batch must be a positive int"),
    (_info(num_classes=10), r"serves 10 classes, but this predictor expects num_classes = 4"),
])
def test_invalid_info_is_reported(info, match):
    remote, _ = fake_predictor(Fake(body(info)), num_classes=K)
    with pytest.raises(RemoteModelError, match=r"GET http://ubw\.test/model/info.*" + match):
        remote.info()


def test_budget_is_checked_before_each_request_and_retry(images):
    fake = Fake(ok)
    remote, _ = fake_predictor(fake, batch_size=4, max_queries=5)
    with pytest.raises(QueryBudgetExceeded, match=r"sending 6 more images .* would make 6 queries"):
        remote(images)
    assert fake.requests == [] and remote.queries == 0  # nothing sent
    fake = Fake(status(500))
    remote, _ = fake_predictor(fake, batch_size=8, max_queries=11, retries=3)
    with pytest.raises(QueryBudgetExceeded, match=r"would make 12 queries.*max_queries = 11 \(6 sent so far\)"):
        remote(images)
    assert len(fake.requests) == 1 and remote.queries == 6  # the retry would have gone over the budget


def test_bad_images_and_settings():
    remote, _ = fake_predictor(Fake(ok))
    with pytest.raises(TypeError, match="uint8"):
        remote(torch.zeros(2, *SHAPE))
    with pytest.raises(ValueError, match=r"N x C x H x W, got shape \(12, 12\)"):
        remote(torch.zeros(12, 12, dtype=torch.uint8))
    with pytest.raises(TypeError, match="list"):
        remote([[0]])
    for bad in ({"batch_size": 0}, {"timeout": 0}, {"retries": -1}, {"backoff": -1.0}, {"max_queries": -1},
                {"num_classes": 0}):
        with pytest.raises(ValueError):
            HTTPPredictor(FAKE_URL, **bad)
    with pytest.raises(ValueError, match="http:// or https://"):
        HTTPPredictor("ubw.test:8000")
    with pytest.raises(TypeError, match="httpx.Client"):
        HTTPPredictor(FAKE_URL, client=object())


def test_close_and_context_manager():
    with HTTPPredictor(FAKE_URL) as remote:
        own = remote._client
    assert own.is_closed
    client = httpx.Client(transport=httpx.MockTransport(ok))
    with HTTPPredictor(FAKE_URL, client=client):
        pass
    assert not client.is_closed  # the caller's client is the caller's to close
    client.close()


# --------------------------------------------------------------------------- the server in process
@pytest.fixture(scope="module")
def app_model():
    return build_model("smallcnn", K, 1, 0.25, seed=0).eval()


@pytest.fixture(scope="module")
def client(app_model):
    with TestClient(make_app(app_model, num_classes=K, image_shape=SHAPE, max_batch=8)) as c:
        yield c


def _request(x, **changes):
    req = encode_images(x)
    req.update(changes)
    return req


def test_app_answers_the_protocol(client, app_model, images):
    assert client.get("/info").json() == _info(outputs="probabilities")
    r = client.post("/predict", json=encode_images(images))
    assert r.status_code == 200
    np.testing.assert_allclose(np.array(r.json()["probabilities"]), predict_proba(app_model, images, precision="fp32").numpy(),
                               rtol=0, atol=1e-7)
    assert client.post("/predict", json=encode_images(images[:0])).json() == {"probabilities": []}


def test_label_only_app(app_model, images):
    with TestClient(make_app(app_model, num_classes=K, image_shape=SHAPE, outputs="labels")) as c:
        assert c.get("/info").json()["outputs"] == "labels"
        labels = c.post("/predict", json=encode_images(images)).json()
        assert labels == {"labels": predict_proba(app_model, images, precision="fp32").argmax(1).tolist()}


@pytest.mark.parametrize("send, code, match", [
    ({"content": b"{not json"}, 400, "not JSON"),
    ({"json": [1, 2]}, 400, "must be a JSON object"),
    ({"json": _request(torch.zeros(2, *SHAPE, dtype=torch.uint8), protocol="ubw-predict/0")}, 400,
     "unsupported protocol 'ubw-predict/0'"),
    ({"json": _request(torch.zeros(2, *SHAPE, dtype=torch.uint8), dtype="float32")}, 400, "dtype must be 'uint8'"),
    ({"json": encode_images(torch.zeros(2, 3, 12, 12, dtype=torch.uint8))}, 400,
     r"shape \[3, 12, 12\] sent, but this model takes \[1, 12, 12\]"),
    ({"json": _request(torch.zeros(2, *SHAPE, dtype=torch.uint8), shape=[2, 1, 12])}, 400, r"\[N, C, H, W\]"),
    ({"json": _request(torch.zeros(2, *SHAPE, dtype=torch.uint8), shape=[3, 1, 12, 12])}, 400,
     "hold 288 bytes, but shape .* needs 432"),
    ({"json": _request(torch.zeros(2, *SHAPE, dtype=torch.uint8), images="%%%")}, 400, "not valid base64"),
    ({"json": _request(torch.zeros(2, *SHAPE, dtype=torch.uint8), images=[0] * 288)}, 400, "base64 string"),
    ({"json": encode_images(torch.zeros(9, *SHAPE, dtype=torch.uint8))}, 413, "more than max_batch = 8"),
    ({"content": b" " * 10_000}, 413, "larger than max_batch"),  # told by Content-Length
    ({"content": iter([b" " * 4000] * 3)}, 413, "^request body larger than max_batch"),  # chunked: counted as read
])
def test_app_rejects_bad_requests(client, send, code, match):
    r = client.post("/predict", **send)
    assert r.status_code == code
    assert set(r.json()) == {"error"}
    assert re.search(match, r.json()["error"])


def test_app_unknown_paths_and_methods_answer_json(client):
    r = client.get("/nowhere")
    assert r.status_code == 404 and "POST /predict" in r.json()["error"]
    r = client.get("/predict")
    assert r.status_code == 405 and "error" in r.json()


class NaNOnBright(torch.nn.Module):
    """Finite logits on dark images (the startup check), NaN when a pixel is bright."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(1, K)

    def forward(self, x):
        logits = self.fc(x.flatten(1).mean(1, keepdim=True))
        return torch.where(x.flatten(1).amax(1, keepdim=True) > 0.5, torch.nan, logits)


def test_model_failure_is_a_500(images):
    with TestClient(make_app(NaNOnBright(), num_classes=K, image_shape=SHAPE)) as c:
        assert c.post("/predict", json=encode_images(torch.zeros(2, *SHAPE, dtype=torch.uint8))).status_code == 200
        r = c.post("/predict", json=encode_images(images))
        assert r.status_code == 500
        assert r.json()["error"].startswith("the model failed: ValueError: the model produced non-finite")


def test_make_app_checks_its_settings(app_model):
    with pytest.raises(ValueError, match="outputs 4 classes .* num_classes = 10"):
        make_app(app_model, num_classes=10, image_shape=SHAPE)
    with pytest.raises(ValueError, match="image_shape"):
        make_app(app_model, num_classes=K, image_shape=(12, 12))
    with pytest.raises(ValueError, match="outputs"):
        make_app(app_model, num_classes=K, image_shape=SHAPE, outputs="logits")
    with pytest.raises(ValueError, match="max_batch"):
        make_app(app_model, num_classes=K, image_shape=SHAPE, max_batch=0)
    with pytest.raises(TypeError, match="nn.Module"):
        make_app(lambda x: x, num_classes=K, image_shape=SHAPE)


# --------------------------------------------------------------------------- weights
def test_load_weights(app_model, tmp_path, images):
    path = tmp_path / "w.pt"
    torch.save(app_model.state_dict(), path)
    loaded = load_weights(str(path), "smallcnn", 0.25, K, 1)
    assert not loaded.training
    torch.testing.assert_close(predict_proba(loaded, images), predict_proba(app_model, images))
    torch.save({"state_dict": app_model.state_dict()}, tmp_path / "ckpt.pt")
    load_weights(str(tmp_path / "ckpt.pt"), "smallcnn", 0.25, K, 1)
    with pytest.raises(ValueError, match="no model weights"):
        load_weights(str(tmp_path / "missing.pt"), "smallcnn", 0.25, K, 1)
    with pytest.raises(ValueError, match=r"do not fit smallcnn at width 0.5 \(.*expected.*check the architecture"):
        load_weights(str(path), "smallcnn", 0.5, K, 1)
    # weights of another dataset (class count, channels): said so, not blamed on the architecture
    with pytest.raises(ValueError, match=f"for {K} classes and 1-channel images, but 7 classes"):
        load_weights(str(path), "smallcnn", 0.25, 7, 1)
    with pytest.raises(ValueError, match="1-channel images, but 4 classes and 3 channels"):
        load_weights(str(path), "smallcnn", 0.25, K, 3)
    torch.save({f"module.{k}": v for k, v in app_model.state_dict().items()}, tmp_path / "dp.pt")
    with pytest.raises(ValueError, match="start with 'module.'"):
        load_weights(str(tmp_path / "dp.pt"), "smallcnn", 0.25, K, 1)
    with pytest.raises(ValueError, match="missing .*unexpected"):
        load_weights(str(path), "resnet18-cifar", 0.25, K, 1)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        load_weights(str(tmp_path / "list.pt"), "smallcnn", 0.25, K, 1)
    torch.save(app_model, tmp_path / "pickled.pt")  # a whole pickled module: refused, no code runs
    with pytest.raises(ValueError, match="not a weights-only state_dict"):
        load_weights(str(tmp_path / "pickled.pt"), "smallcnn", 0.25, K, 1)
    with pytest.raises(ValueError, match="unknown model"):
        load_weights(str(path), "vgg", 0.25, K, 1)


def test_main_reports_bad_weights(tmp_path, capsys):
    assert main([str(tmp_path / "missing.pt"), "--arch", "smallcnn", "--classes", "4", "--shape", "1", "12", "12"]) == 1
    assert "ubw serve: no model weights" in capsys.readouterr().err
