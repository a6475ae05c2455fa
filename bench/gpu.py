"""``gda bench gpu``: the teacher and latency benchmarks again, with the models on CUDA, on a materialized
home (``gda demo`` first). Without a CUDA device it says so, in the table and in the JSON (``cuda: false``
with the reason), and measures nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bench import Setting, latency, teacher


def run(setting: Setting) -> dict[str, Any]:
    import torch

    result: dict[str, Any] = {**setting.header("gpu"), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        reason = (
            f"torch {torch.__version__} sees no CUDA device (built for CUDA: {torch.version.cuda or 'no, a CPU build'})"
        )
        return {**result, "cuda": False, "reason": reason, "table": [["CUDA", "none", reason]]}
    on_gpu = dataclasses.replace(setting, device="cuda")
    parts = {"teacher": teacher.run(on_gpu), "latency": latency.run(on_gpu)}
    result |= {"cuda": True, "device": "cuda", "gpu": torch.cuda.get_device_name(0), **parts}
    result["table"] = [["GPU", "", result["gpu"]]] + [
        [f"{name}: {label}", value, unit] for name, part in parts.items() for label, value, unit in part["table"]
    ]
    return result
