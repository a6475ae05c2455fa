"""Where heavy work runs: the torch device, its precision and CPU threads. Assets that use it sit in the
``gpu`` pool."""

from typing import Literal

import dagster as dg


class Compute(dg.ConfigurableResource):
    device: str = "cpu"  # "cuda", "cuda:1", "mps" on machines that have one
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    # Precision of forward-only work: the frozen encoders and sampling queries. The diffusion loss, its
    # gradients, the unlearning step and the EK-FAC factors are float32 whatever this says (a loss change of
    # 1e-4 is below float16's resolution), and eigendecompositions float64.
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        import torch

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise dg.Failure(f"compute.device is {self.device!r} but torch sees no CUDA device; set device: cpu")

    def torch_dtype(self):  # -> torch.dtype (torch is imported only where work runs)
        import torch

        return getattr(torch, self.dtype)
