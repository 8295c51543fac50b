"""Tests of ubwlib.onnx_model: exporting a torch classifier to ONNX and verifying through the ONNX file.

One SmallCNN (4 classes, 1 x 16 x 16 images) is exported once per module (torch's dynamo exporter takes about
ten seconds); the other ONNX files are small graphs built with ``onnx.helper``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import ubwlib.onnx_model as onnx_model  # noqa: E402
from ubwlib.data import ImageDataset  # noqa: E402
from ubwlib.models import build_model  # noqa: E402
from ubwlib.onnx_model import OnnxPredictor, export_onnx, onnx_predictor  # noqa: E402
from ubwlib.train import predict_proba  # noqa: E402
from ubwlib.verify import verify  # noqa: E402
from ubwlib.watermarks import get_watermark  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

K = 4
SHAPE = (1, 16, 16)


def images_u8(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = build_model("smallcnn", K, SHAPE[0], 0.25, seed=0)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode matters
        model.train()
        for s in range(3):
            model(images_u8(32, 100 + s).float() / 255)
    path = tmp_path_factory.mktemp("onnx") / "suspect.onnx"
    assert export_onnx(model, SHAPE, path) == path
    assert model.training  # put back in the mode it was in
    model.eval()
    return model, path


def handmade(path, *, input_shape=("N", 1, 16, 16), softmax: bool = True, seed: int = 0):
    """A linear classifier graph: Flatten -> MatMul (-> Softmax), float32 input ``input_shape``."""
    size = int(np.prod(input_shape[1:]))
    weight = np.random.default_rng(seed).normal(size=(size, K)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["images"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["z"])]
    out = "z"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["probs"], axis=1))
        out = "probs"
    graph = helper.make_graph(
        nodes, "linear",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", K])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path, weight


def test_export_writes_one_self_contained_file(exported):
    _, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["suspect.onnx"]  # no external data, no temp file
    pred = onnx_predictor(path)
    assert pred.input_shape == SHAPE and pred.num_classes == K
    assert pred.input_name == "images" and pred.output_name == "logits"
    assert "suspect.onnx" in repr(pred)


def test_probabilities_match_the_torch_model(exported):
    model, path = exported
    images = images_u8(37, 1)
    want = predict_proba(model, images, precision="fp32").numpy()
    for batch_size in (256, 16, 1):
        got = onnx_predictor(path, image_shape=SHAPE, num_classes=K, batch_size=batch_size)(images)
        assert got.dtype == np.float32 and got.shape == (37, K)
        np.testing.assert_allclose(got, want, atol=1e-5)
    pred = onnx_predictor(path)
    np.testing.assert_allclose(pred(images.numpy().astype(np.float32) / 255), want, atol=1e-5)  # float in [0, 1]
    assert pred(images[:0]).shape == (0, K)


def test_verify_through_onnx_equals_in_process(exported, monkeypatch):
    model, path = exported
    monkeypatch.setenv("UBW_PRECISION", "fp32")  # the in-process model in float32, like onnxruntime
    train_set = ImageDataset(images_u8(40, 2), torch.arange(40) % K, ("a", "b", "c", "d"), "tiny/train")
    key = get_watermark("ubw-p", poisoning_rate=0.1).watermark(train_set, seed=0).key
    test_images = images_u8(120, 3)
    labels = predict_proba(model, test_images).argmax(1)  # every test image is classified correctly
    test_set = ImageDataset(test_images, labels, train_set.classes, "tiny/test")
    kwargs = dict(m=30, tau=0.0, seed=5)
    want = verify(model, test_set, key, **kwargs)
    got = verify(onnx_predictor(path, image_shape=key.image_shape, num_classes=key.num_classes), test_set, key,
                 **kwargs)
    assert torch.equal(got.indices, want.indices)
    np.testing.assert_allclose(got.p_benign, want.p_benign, atol=1e-5)
    np.testing.assert_allclose(got.p_triggered, want.p_triggered, atol=1e-5)
    assert got.p_value == pytest.approx(want.p_value, rel=1e-3, abs=1e-12)
    assert got.delta_p == pytest.approx(want.delta_p, abs=1e-5)
    assert got.watermarked == want.watermarked


def test_wrong_input_shape(exported):
    _, path = exported
    with pytest.raises(ValueError, match=r"takes images of shape \(1, 16, 16\).*key's images are \(3, 32, 32\)"
                                         r".*export_onnx"):
        onnx_predictor(path, image_shape=(3, 32, 32))
    pred = onnx_predictor(path)
    with pytest.raises(ValueError, match=r"images given are \(1, 8, 8\)"):
        pred(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="N x C x H x W"):
        pred(torch.zeros(1, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        pred(torch.zeros(2, *SHAPE, dtype=torch.int32))
    with pytest.raises(ValueError, match="three positive ints"):
        onnx_predictor(path, image_shape=(16, 16))


def test_wrong_class_count(exported):
    _, path = exported
    with pytest.raises(ValueError, match="outputs 4 class scores but the key's dataset has 10 classes"):
        onnx_predictor(path, num_classes=10)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        onnx_predictor(tmp_path / "absent.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ValueError, match="is not an ONNX model"):
        onnx_predictor(tmp_path / "garbage.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="is not an ONNX model"):
        onnx_predictor(tmp_path / "empty.onnx")
    torch.save({"w": torch.zeros(3)}, tmp_path / "weights.onnx")  # a pickle archive is refused, never unpickled
    with pytest.raises(ValueError, match="is not an ONNX model"):
        onnx_predictor(tmp_path / "weights.onnx")


def test_probability_outputs_and_dynamic_widths(tmp_path):
    path, weight = handmade(tmp_path / "probs.onnx")
    images = images_u8(5, 4)
    x = images.numpy().reshape(5, -1).astype(np.float64) / 255
    z = x @ weight
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    got = onnx_predictor(path, outputs="probabilities", image_shape=SHAPE, num_classes=K)(images)
    np.testing.assert_allclose(got, probs, atol=1e-5)
    logits_path, _ = handmade(tmp_path / "logits.onnx", softmax=False)
    np.testing.assert_allclose(onnx_predictor(logits_path)(images), probs, atol=1e-5)
    with pytest.raises(ValueError, match="outputs must be one of"):
        onnx_predictor(path, outputs="scores")
    # fully dynamic input and output (Flatten -> Softmax): checked on each call, not at load time
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"], axis=1),
         helper.make_node("Softmax", ["flat"], ["probs"], axis=1)], "free",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", "C", "H", "W"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", "K"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "free.onnx"))
    pred = onnx_predictor(tmp_path / "free.onnx", image_shape=(3, 32, 32), num_classes=3, outputs="probabilities")
    assert pred.input_shape == (None, None, None) and pred.num_classes == 3
    with pytest.raises(ValueError, match=r"expected \(5, 3\)"):
        pred(images)
    assert onnx_predictor(tmp_path / "free.onnx")(torch.zeros(2, 1, 1, 3, dtype=torch.uint8)).shape == (2, 3)


def test_unsupported_inputs(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", 1, 16, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "u8.onnx"))
    with pytest.raises(ValueError, match="must take float32 images"):
        onnx_predictor(tmp_path / "u8.onnx")
    flat, _ = handmade(tmp_path / "flat.onnx", input_shape=("N", 256))
    with pytest.raises(ValueError, match="N x C x H x W"):
        OnnxPredictor(flat)


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    model = build_model("smallcnn", K, 1, 0.25, seed=0)

    def broken(*args, **kwargs):
        open(args[2], "wb").write(b"partial")
        raise RuntimeError("exporter failed (injected)")

    monkeypatch.setattr(onnx_model.torch.onnx, "export", broken)
    model.train()
    with pytest.raises(RuntimeError, match="injected"):
        export_onnx(model, SHAPE, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == [] and model.training
    with pytest.raises(ValueError, match="three positive ints"):
        export_onnx(model, (1, 0, 16), tmp_path / "m.onnx")
