"""torch (CPU) nodes: a seeded ``torch.nn`` MLP, STFT / log-mel features, and TorchScript models
loaded from a file.

numpy <-> torch without extra copies: ``torch.from_numpy`` shares the array's memory and
``Tensor.numpy()`` shares it back. Inputs arrive as read-only views over the request buffer (or a
worker's shared memory); torch has no read-only tensors, so ``from_numpy`` on them emits a
one-time UserWarning that writes would be undefined. These nodes never write into an input (every
operation they apply allocates its result), so sharing is safe and copying the input only to
silence the warning would cost a full copy per call: the warning is filtered process-wide for
that exact message only, once, when this module is imported (``warnings.catch_warnings`` around
each call would not be thread-safe, and in-process nodes run concurrently in threads). Only a
dtype conversion (int16 PCM -> float32, float64 -> float32) copies, because it must.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from tensorline.server.nodes._model_files import ModelPath, check_unchanged
from tensorline.server.nodes._node import Node, NodeParams, NodeTraits, Port
from tensorline.server.nodes.ecosystem._model_inputs import (
    MODEL_INPUT,
    MODEL_OUTPUT,
    bind_model_inputs,
)
from tensorline.wire import Audio

if TYPE_CHECKING:
    import torch

TENSORLINE_REQUIRES = ("torch",)

# The sandbox memory cap (RLIMIT_DATA) of the torch nodes' worker. A worker with torch imported
# and both nodes warm measured ~240 MiB RSS (bench/bench_runtimes.py, memory section); 1 GiB
# leaves room for larger inputs (a 10-minute clip's spectrogram) without the 2 GiB default.
TORCH_MEMORY_MB = 1024

_READONLY_WARNING = "The given NumPy array is not writable"
warnings.filterwarnings("ignore", message=_READONLY_WARNING, category=UserWarning)


def to_torch(array: npt.NDArray[Any], dtype: npt.DTypeLike = np.float32) -> torch.Tensor:
    """A CPU tensor over ``array`` (no copy when it is already C-contiguous ``dtype``).

    The result may share memory with a read-only input: never modify it in place.
    """
    import torch

    # Shares a read-only input too (the module docstring says why that is safe).
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))


def to_numpy(tensor: torch.Tensor) -> npt.NDArray[Any]:
    """The tensor's memory as a numpy array (no copy for a contiguous CPU tensor)."""
    result: npt.NDArray[Any] = tensor.detach().contiguous().numpy()
    return result


def pcm_to_float32(samples: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Audio samples as float32 in [-1, 1): integer PCM is scaled by its full range (uint8 is
    offset binary); float input is only cast (no copy when it is float32 already)."""
    if np.issubdtype(samples.dtype, np.unsignedinteger):
        half = float(np.iinfo(samples.dtype).max // 2 + 1)
        return ((samples.astype(np.float32) - np.float32(half)) / np.float32(half))
    if np.issubdtype(samples.dtype, np.integer):
        scale = float(-np.iinfo(samples.dtype).min)
        return samples.astype(np.float32) / np.float32(scale)
    return np.asarray(samples, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# The MLP


class TorchMLPParams(NodeParams):
    in_features: int = Field(gt=0, le=65536, description="size of the last input dimension")
    hidden: list[int] = Field(default_factory=lambda: [64], description="hidden layer sizes")
    out_features: int = Field(gt=0, le=65536, description="number of outputs (classes)")
    seed: int = Field(0, ge=0, description="seed of the deterministic weight initialisation")
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    output: Literal["logits", "softmax", "sigmoid"] = Field(
        "softmax", description="what the last layer's outputs become")
    pool: Literal["none", "mean", "max"] = Field(
        "none", description="pool the logits over all leading dimensions (e.g. frames) into one "
                            "vector before the output function")

    @model_validator(mode="after")
    def _layer_sizes(self) -> TorchMLPParams:
        if any(size <= 0 or size > 65536 for size in self.hidden):
            raise ValueError("hidden layer sizes must be in 1..65536")
        return self


def build_mlp(params: TorchMLPParams) -> torch.nn.Sequential:
    """The MLP with weights drawn from a CPU generator seeded with ``params.seed`` (He-normal
    weights, small normal biases): the same params give the same model in every process."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    activations: dict[str, type[torch.nn.Module]] = {
        "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "gelu": torch.nn.GELU}
    sizes = [params.in_features, *params.hidden, params.out_features]
    layers: list[torch.nn.Module] = []
    with torch.no_grad():
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            linear = torch.nn.Linear(fan_in, fan_out)
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=generator)
                                * math.sqrt(2.0 / fan_in))
            linear.bias.copy_(torch.randn(fan_out, generator=generator) * 0.01)
            layers.append(linear)
            if index < len(sizes) - 2:
                layers.append(activations[params.activation]())
    model = torch.nn.Sequential(*layers)
    model.eval()
    model.requires_grad_(False)
    return model


class TorchMLP(Node):
    """A small ``torch.nn`` MLP (CPU, float32) with weights created from a seed: no downloads.

    Input: a float tensor whose last dimension is ``in_features`` (e.g. frames x features).
    Output: float32, the input's leading shape x ``out_features`` (or ``out_features`` alone
    when pooled), after softmax/sigmoid unless ``output=logits``. The model is built once per
    process (reusable: one warm instance per params, shared across requests) and runs under
    ``torch.inference_mode``.
    """

    Params = TorchMLPParams
    params: TorchMLPParams
    inputs = (Port("in", kind="tensor", description="float, last dim = in_features"),)
    outputs = (Port("out", kind="tensor", description="float32 scores"),)
    traits = NodeTraits(libraries=("torch",), memory_mb=TORCH_MEMORY_MB)
    reusable = True

    def initialize(self) -> None:
        self.model = build_mlp(self.params)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        import torch

        array = inputs["in"]
        if array.ndim == 0 or array.shape[-1] != self.params.in_features:
            raise ValueError(f"expected a tensor whose last dimension is "
                             f"{self.params.in_features}, got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise ValueError(f"expected a real numeric tensor, got {array.dtype}")
        with torch.inference_mode():
            logits = self.model(to_torch(array))
            if self.params.pool == "mean":
                logits = logits.reshape(-1, self.params.out_features).mean(dim=0)
            elif self.params.pool == "max":
                logits = logits.reshape(-1, self.params.out_features).amax(dim=0)
            if self.params.output == "softmax":
                logits = torch.softmax(logits, dim=-1)
            elif self.params.output == "sigmoid":
                logits = torch.sigmoid(logits)
            return to_numpy(logits)


# ------------------------------------------------------------------------------------------------
# STFT / log-mel features


class TorchSpectrogramParams(NodeParams):
    n_fft: int = Field(512, ge=8, le=65536, description="FFT size = window length in samples")
    hop_length: int | None = Field(None, gt=0, description="samples between frames (n_fft // 4)")
    window: Literal["hann", "hamming", "rectangular"] = "hann"
    center: bool = Field(True, description="reflect-pad so frames are centred on hop multiples")
    power: Literal[1, 2] = Field(1, description="1 = magnitude, 2 = power")
    n_mels: int | None = Field(None, gt=0, le=1024,
                               description="mel bands (HTK scale); unset = linear FFT bins")
    f_min: float = Field(0.0, ge=0, description="lowest mel band edge in Hz")
    f_max: float | None = Field(None, gt=0, description="highest mel band edge (Nyquist)")
    log: bool = Field(False, description="natural log of max(value, log_floor)")
    log_floor: float = Field(1e-10, gt=0)


def hz_to_mel(hz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    result: npt.NDArray[np.float64] = 2595.0 * np.log10(1.0 + hz / 700.0)
    return result


def mel_to_hz(mel: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    result: npt.NDArray[np.float64] = 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    return result


@lru_cache(maxsize=32)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float,
                   f_max: float) -> npt.NDArray[np.float32]:
    """Triangular filters on the HTK mel scale, shape (n_mels, n_fft // 2 + 1), float32.

    Computed in float64 numpy (deterministic everywhere) and cached per rate: requests at the
    same rate share one read-only matrix.
    """
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    low, high = hz_to_mel(np.array([f_min, f_max], dtype=np.float64))
    edges = mel_to_hz(np.linspace(low, high, n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    bank = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    bank.flags.writeable = False
    return bank


class TorchSpectrogram(Node):
    """STFT features of audio with torch: magnitude or power spectrogram, optionally on a mel
    scale and/or logarithmic.

    Multi-channel audio is averaged to mono first; integer PCM is scaled to [-1, 1). Output:
    float32, frames x bins (``n_fft // 2 + 1`` linear bins, or ``n_mels``), i.e. ready for a
    frame-wise model such as ``TorchMLP`` with ``in_features`` = bins.
    """

    Params = TorchSpectrogramParams
    params: TorchSpectrogramParams
    inputs = (Port("in", kind="audio"),)
    outputs = (Port("out", kind="tensor", description="float32, frames x bins"),)
    traits = NodeTraits(libraries=("torch",), memory_mb=TORCH_MEMORY_MB)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        import torch

        audio: Audio = inputs["in"]
        params = self.params
        # Scale first (integer PCM -> [-1, 1)), then average the channels in float32.
        mono = pcm_to_float32(audio.samples)
        if mono.ndim == 2:
            mono = mono.mean(axis=1, dtype=np.float32) if mono.shape[1] > 1 else mono[:, 0]
        if params.center and mono.shape[0] <= params.n_fft // 2:
            raise ValueError(f"{mono.shape[0]} samples is too short for n_fft={params.n_fft} "
                             "with center=True (needs more than n_fft // 2)")
        if not params.center and mono.shape[0] < params.n_fft:
            raise ValueError(f"{mono.shape[0]} samples is shorter than n_fft={params.n_fft}")
        f_max = params.f_max if params.f_max is not None else audio.sample_rate / 2
        if params.n_mels is not None and not params.f_min < f_max <= audio.sample_rate / 2:
            raise ValueError(f"need f_min < f_max <= {audio.sample_rate / 2} Hz (Nyquist)")
        hop = params.hop_length or max(1, params.n_fft // 4)
        with torch.inference_mode():
            window = _window(params.window, params.n_fft)
            spec = torch.stft(to_torch(mono), params.n_fft, hop_length=hop, window=window,
                              center=params.center, pad_mode="reflect", return_complex=True)
            features = spec.abs()
            if params.power == 2:
                features = features.square()
            if params.n_mels is not None:
                bank = mel_filterbank(audio.sample_rate, params.n_fft, params.n_mels,
                                      params.f_min, f_max)
                features = to_torch(bank) @ features
            if params.log:
                features = features.clamp_min(params.log_floor).log()
            return to_numpy(features.T)


def _window(name: str, length: int) -> torch.Tensor:
    import torch

    if name == "hann":
        return torch.hann_window(length, periodic=True, dtype=torch.float32)
    if name == "hamming":
        return torch.hamming_window(length, periodic=True, dtype=torch.float32)
    return torch.ones(length, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# TorchScript models


class TorchScriptModelParams(NodeParams):
    path: ModelPath
    output: int | str | None = Field(
        None, description="which part of a tuple/list (index) or dict (key) result port 'out' "
                          "gives; unset: the result must be one tensor (or a 1-tuple)")


class TorchScriptModel(Node):
    """A TorchScript model file (``torch.jit.save``) run on the CPU: tensors in, a tensor out.

    Port ``in`` takes one tensor per argument of the model's ``forward`` (a one-argument model:
    one plain tensor; several: each tagged ``{"input": argument name}``, or untagged in argument
    order), passed without conversion: dtypes are the model's to expect. Port ``out`` gives the
    result, or the part of a tuple/list/dict result ``output`` selects. ``path`` names the file
    below the server's model roots; it is loaded once per warm instance. torch's thread count is
    per process (``torch.set_num_threads``), so this node leaves it as it is.
    """

    Params = TorchScriptModelParams
    params: TorchScriptModelParams
    inputs = (MODEL_INPUT,)
    outputs = (MODEL_OUTPUT,)
    traits = NodeTraits(libraries=("torch",))
    reusable = True

    def initialize(self) -> None:
        import torch

        path = self.params.path
        name = os.path.basename(path)
        try:
            module = torch.jit.load(check_unchanged(path), map_location="cpu")
        except Exception as exc:
            reason = str(exc).replace(path, name).strip().splitlines()
            raise ValueError(f"cannot load the TorchScript model {name!r}: "
                             f"{reason[0] if reason else type(exc).__name__}") from None
        module.eval()
        self.module = module
        # forward's schema names its arguments (the first is the module itself).
        self.argument_names = [arg.name for arg in module.forward.schema.arguments[1:]]

    def process(self, inputs: Mapping[str, Any]) -> Any:
        import torch

        feeds = bind_model_inputs(inputs["in"], self.argument_names)
        # Shares the (read-only) input memory; the module docstring says why that is safe.
        tensors = [torch.from_numpy(np.ascontiguousarray(array)) for array in feeds.values()]
        with torch.inference_mode():
            try:
                result = self.module(*tensors)
            except RuntimeError as exc:
                # A TorchScript error message carries the model's source and traceback.
                lines = [line for line in str(exc).splitlines() if line.strip()]
                raise ValueError(f"the model failed: {lines[-1] if lines else exc}") from None
            selected = self._select(result)
            return to_numpy(selected)

    def _select(self, result: Any) -> Any:
        import torch

        choice = self.params.output
        if isinstance(result, dict):
            if choice is None or choice not in result:
                raise ValueError(f"the model returns a dict (keys: {', '.join(map(str, result))})"
                                 f"; set output to one of its keys")
            result = result[choice]
        elif isinstance(result, tuple | list):
            if choice is None and len(result) == 1:
                choice = 0
            if not isinstance(choice, int) or not -len(result) <= choice < len(result):
                raise ValueError(f"the model returns {len(result)} values; set output to an "
                                 f"index below {len(result)}")
            result = result[choice]
        elif choice is not None:
            raise ValueError("the model returns one tensor: output must be unset")
        if not isinstance(result, torch.Tensor):
            raise ValueError(f"the selected model output is a {type(result).__name__}, "
                             "not a tensor")
        return result


TENSORLINE_NODES = (TorchMLP, TorchSpectrogram, TorchScriptModel)
