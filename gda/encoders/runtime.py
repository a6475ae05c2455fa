"""How an encoder's network runs: eager PyTorch, or ONNX Runtime on CPU.

An encoder keeps its preprocessing (image resizing, tokenising) in Python and hands this module its network:
a torch module from numpy-able input arrays to one float feature tensor. On CPU in float32 the default
(`runtime="auto"`) exports that network to ONNX once and runs it with ONNX Runtime, which on 2 cores ran
EfficientNet-Lite0 at 128 px in 3.3 ms instead of 19 ms and MiniLM in 5.6 ms instead of 19 ms for one item
(`gda bench latency` has the end-to-end figures), with features equal to eager PyTorch's to about 1e-6 of
their scale (a test checks every backend). On CUDA, and in half precision, `auto` runs eager PyTorch: there
the kernels are cuDNN's and cuBLAS's either way, and ONNX Runtime's CPU build has no CUDA.

With `text_quantization="int8"` a text encoder's graph is quantized once more, by ONNX Runtime's dynamic
quantization (8-bit per-channel weights, 7 bits of range so that CPUs without VNNI do not saturate). One
query's text encoding streams every weight once, so it is bound by memory traffic: MiniLM's 90 MB of float
weights took 5.7 ms on one core, its int8 weights 1.9 ms, with features at cosine 0.991 to 0.995 of the
float ones. These are other features, so the setting is part of the encoder's version. Dynamic quantization
scales activations by the range of the whole input tensor, so texts batched together, and their padding,
would change each other's features: the int8 network runs one text at a time, unpadded, which keeps a text's
features a function of the text alone. Image encoders stay float: EfficientNet-Lite0's convolutions ran 10x
slower dynamically quantized, and wrong.

The exported graph is cached on disk (`$GDA_CACHE_DIR`, else `$XDG_CACHE_HOME/gda` or `~/.cache/gda`), keyed
by the encoder's version, the input shapes' signature and the torch version, so a server or an asset run
pays the export (about 1.5 s per encoder) once per machine, not once per process.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from gda.encoders import EncoderSpec

RUNTIMES = ("auto", "eager", "onnx")
TEXT_QUANTIZATIONS = ("none", "int8")
TOKEN_INPUTS = ("input_ids", "attention_mask")
_OPSET = 17

Network = Callable[..., np.ndarray]


def chosen_runtime(runtime: str, device: str, dtype: str) -> str:
    """The runtime `runtime` means on `device` in `dtype` ('eager' or 'onnx')."""
    if runtime not in RUNTIMES:
        raise ValueError(f"encoder runtime must be one of {RUNTIMES}, got {runtime!r}")
    on_cpu_float32 = torch.device(device).type == "cpu" and dtype == "float32"
    if runtime == "onnx" and not on_cpu_float32:
        raise ValueError(f"the onnx encoder runtime runs on CPU in float32 only, not {device} {dtype}: use eager")
    if runtime == "auto":
        return "onnx" if on_cpu_float32 else "eager"
    return runtime


def text_int8(spec: EncoderSpec) -> bool:
    """Whether `spec` quantizes its text encoder to int8; ValueError where that cannot run."""
    if spec.text_quantization not in TEXT_QUANTIZATIONS:
        raise ValueError(f"text_quantization must be one of {TEXT_QUANTIZATIONS}, got {spec.text_quantization!r}")
    if spec.text_quantization == "none":
        return False
    if chosen_runtime(spec.runtime, spec.device, spec.dtype) != "onnx":
        raise ValueError(
            f"int8 text quantization runs on ONNX Runtime, on CPU in float32, not {spec.device} {spec.dtype} with "
            f"runtime {spec.runtime}: set text_quantization to none"
        )
    return True


def version_tag(spec: EncoderSpec) -> str:
    """What a text encoder's version adds for `spec`'s quantization (nothing for float weights)."""
    return ";weights=int8" if text_int8(spec) else ""


def cache_dir() -> Path:
    if os.environ.get("GDA_CACHE_DIR"):
        return Path(os.environ["GDA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gda"


def compile_network(
    module: torch.nn.Module,
    example: Sequence[np.ndarray],
    input_names: Sequence[str],
    spec: EncoderSpec,
    version: str,
    int8: bool = False,
) -> Network:
    """`module` as a function from numpy input arrays (named `input_names`, each with a dynamic first axis and,
    for integer token inputs, a dynamic second axis) to a float32 numpy array, run by the runtime `spec` picks;
    with `int8`, its weights quantized (ONNX Runtime only)."""
    module = module.eval().requires_grad_(False)
    if chosen_runtime(spec.runtime, spec.device, spec.dtype) == "eager":
        return _eager(module)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = spec.threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Spinning threads that wait for a core another process holds slowed this 2-core machine down before.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    graph = _exported(module, example, input_names, version, int8)
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def run(*arrays: np.ndarray) -> np.ndarray:
        feed = {name: np.ascontiguousarray(array) for name, array in zip(input_names, arrays, strict=True)}
        return session.run(None, feed)[0].astype(np.float32, copy=False)

    return run


def compile_text_network(module: torch.nn.Module, spec: EncoderSpec, version: str) -> Network:
    """A network from token ids and their attention mask, as `encode_tokens` feeds it."""
    example = np.ones((2, 8), dtype=np.int64)
    int8 = text_int8(spec)
    network = compile_network(module, [example, example], TOKEN_INPUTS, spec, version, int8=int8)
    return _one_text_at_a_time(network) if int8 else network


def _one_text_at_a_time(network: Network) -> Network:
    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            kept = mask.astype(bool)
            rows.append(network(ids[kept][None], mask[kept][None]))
        return np.concatenate(rows)

    return run


def encode_tokens(
    network: Network, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> np.ndarray:
    """`network` on `texts`, tokenised and padded to the longest of them (at most `max_length` tokens)."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return network(*(batch[name].astype(np.int64) for name in TOKEN_INPUTS))


def _eager(module: torch.nn.Module) -> Network:
    parameter = next(module.parameters())

    @torch.inference_mode()
    def run(*arrays: np.ndarray) -> np.ndarray:
        tensors = [torch.from_numpy(np.ascontiguousarray(array)).to(parameter.device) for array in arrays]
        tensors = [t.to(parameter.dtype) if t.is_floating_point() else t for t in tensors]
        return module(*tensors).float().cpu().numpy()

    return run


def _signature(example: Sequence[np.ndarray]) -> str:
    """What the exported graph depends on besides the weights: the inputs' dtypes and fixed dimensions."""
    return ";".join(f"{a.dtype}:{'x'.join(str(d) for d in _fixed_shape(a))}" for a in example)


def _fixed_shape(array: np.ndarray) -> tuple[int | str, ...]:
    dynamic = 2 if array.dtype.kind in "iu" else 1
    return tuple("n" if axis < dynamic else size for axis, size in enumerate(array.shape))


def _exported(
    module: torch.nn.Module, example: Sequence[np.ndarray], input_names: Sequence[str], version: str, int8: bool
) -> bytes:
    key = f"{version}|{_signature(example)}|{torch.__version__}|{_OPSET}"
    graph = _cached(_graph_path(key), lambda path: path.write_bytes(_export(module, example, input_names)))
    if not int8:
        return graph
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def quantize(path: Path) -> None:
        quantize_dynamic(_graph_path(key), path, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)

    return _cached(_graph_path(f"{key}|int8"), quantize)


def _graph_path(key: str) -> Path:
    return cache_dir() / "onnx" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"


def _cached(path: Path, write: Callable[[Path], None]) -> bytes:
    """The bytes of `path`, written first by `write` (to a temporary file beside it) when it is missing."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.onnx")
        try:
            write(temp)
            os.replace(temp, path)  # two processes writing at once both write whole files; one wins
        finally:
            temp.unlink(missing_ok=True)
    return path.read_bytes()


def _export(module: torch.nn.Module, example: Sequence[np.ndarray], input_names: Sequence[str]) -> bytes:
    dynamic_axes = {
        name: {axis: f"{name}_{axis}" for axis, size in enumerate(_fixed_shape(array)) if size == "n"}
        for name, array in zip(input_names, example, strict=True)
    }
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The tracing exporter warns about every Python-side shape check it freezes; none applies to the axes
        # declared dynamic here, and the equality test against eager features would catch one that did.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(np.ascontiguousarray(array)) for array in example),
            buffer,
            input_names=list(input_names),
            output_names=["features"],
            dynamic_axes={**dynamic_axes, "features": {0: "features_0"}},
            opset_version=_OPSET,
            dynamo=False,
        )
    return buffer.getvalue()
