"""How an encoder's network runs: eager PyTorch, or ONNX Runtime on CPU.

An encoder keeps its preprocessing (image resizing, tokenising) in Python and hands this module its network:
a torch module from numpy-able input arrays to one float feature tensor. On CPU in float32 the default
(`runtime="auto"`) exports that network to ONNX once and runs it with ONNX Runtime, which on 2 cores ran
EfficientNet-Lite0 at 128 px in 3.3 ms instead of 19 ms and MiniLM in 5.6 ms instead of 19 ms for one item
(`gda bench latency` has the end-to-end figures), with features equal to eager PyTorch's to about 1e-6 of
their scale (a test checks every backend). On CUDA, and in half precision, `auto` runs eager PyTorch: there
the kernels are cuDNN's and cuBLAS's either way, and ONNX Runtime's CPU build has no CUDA.

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


def cache_dir() -> Path:
    if os.environ.get("GDA_CACHE_DIR"):
        return Path(os.environ["GDA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gda"


def compile_network(
    module: torch.nn.Module, example: Sequence[np.ndarray], input_names: Sequence[str], spec: EncoderSpec, version: str
) -> Network:
    """`module` as a function from numpy input arrays (named `input_names`, each with a dynamic first axis and,
    for integer token inputs, a dynamic second axis) to a float32 numpy array, run by the runtime `spec` picks."""
    module = module.eval().requires_grad_(False)
    if chosen_runtime(spec.runtime, spec.device, spec.dtype) == "eager":
        return _eager(module)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = spec.threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Spinning threads that wait for a core another process holds slowed this 2-core machine down before.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    graph = _exported(module, example, input_names, version)
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def run(*arrays: np.ndarray) -> np.ndarray:
        feed = {name: np.ascontiguousarray(array) for name, array in zip(input_names, arrays, strict=True)}
        return session.run(None, feed)[0].astype(np.float32, copy=False)

    return run


def compile_text_network(module: torch.nn.Module, spec: EncoderSpec, version: str) -> Network:
    """A network from token ids and their attention mask, as `encode_tokens` feeds it."""
    example = np.ones((2, 8), dtype=np.int64)
    return compile_network(module, [example, example], TOKEN_INPUTS, spec, version)


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
    module: torch.nn.Module, example: Sequence[np.ndarray], input_names: Sequence[str], version: str
) -> bytes:
    key = hashlib.sha256(f"{version}|{_signature(example)}|{torch.__version__}|{_OPSET}".encode()).hexdigest()[:16]
    path = cache_dir() / "onnx" / f"{key}.onnx"
    if path.is_file():
        return path.read_bytes()
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
    graph = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        temp.write_bytes(graph)
        os.replace(temp, path)  # two processes exporting at once both write whole files; one wins
    finally:
        temp.unlink(missing_ok=True)
    return graph
