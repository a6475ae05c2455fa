"""Where heavy work runs: the torch device and CPU threads. Assets that use it sit in the ``gpu`` pool."""


import dagster as dg


class Compute(dg.ConfigurableResource):
    device: str = "cpu"  # "cuda", "cuda:1", "mps" on machines that have one
    threads: int | None = None  # torch intra-op threads; None leaves torch's default

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        import torch

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise dg.Failure(f"compute.device is {self.device!r} but torch sees no CUDA device; set device: cpu")
