"""Where steps run: ``local`` (the default: Dagster's default executor, exactly what ``gda`` and ``gda ui``
have always done) or ``k8s`` (Dagster's ``k8s_job_executor``: every step of every run is its own
Kubernetes Job, and steps of ``pool="gpu"`` assets request GPUs). Chosen with ``GDA_DEPLOYMENT``; the
Kubernetes values come from ``GDA_K8S_*`` environment variables (``K8sSettings``).

Why the executor's config and not ``dagster-k8s/config`` tags: the k8s executor builds a step pod from the
run launcher's config, the code location's container context (the Helm user deployment), its own config,
the op's ``dagster-k8s/config`` tag and its own ``per_step_k8s_config`` for that op, in that order. It never
reads job or run tags for step pods (``include_run_tags=False`` in dagster-k8s 0.29): those shape only the
run worker pod, which here only orchestrates. Op tags would need the asset decorators to know the
deployment; the executor set on ``Definitions`` is the one every job resolves to (the UI's implicit asset
job, ``define_asset_job`` jobs, backfills, sensors, the automation sensor), so its per-op entries reach
every launch path.

Docs: ``docs/deployment.md``, section Kubernetes.
"""

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from gda.home import Home
from gda.profiles import SD_PATHS, resolve_profile

LOCAL = "local"
K8S = "k8s"
DEPLOYMENTS = (LOCAL, K8S)

# The pod-spec name of the shared volume. The Helm values in docs/deployment.md use the same name and
# claim: dagster-k8s drops a volume listed twice only when both entries are identical, and Kubernetes
# rejects a pod whose volumes repeat a name.
VOLUME_NAME = "gda-home"

# GPU nodes are commonly tainted so that only pods asking for a GPU land on them (GKE and the NVIDIA GPU
# operator use this key); tolerating it is harmless where the taint is absent.
DEFAULT_GPU_TOLERATIONS = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)


@dataclass(frozen=True)
class K8sSettings:
    """What a Kubernetes deployment needs to know that the code cannot: the cluster's names and sizes.

    ``from_env`` reads each field from the variable named in its comment. The code location, the run
    worker and every step pod build the definitions from the same environment (the Helm user
    deployment's ``env``), so they agree.
    """

    # GDA_K8S_IMAGE. None: step pods run the image the code location runs (the Helm user deployment's),
    # which is what keeps the run worker and its steps on the same code.
    image: str | None = None
    # GDA_K8S_PVC: a ReadWriteMany claim; every step pod of every node mounts it at the same path.
    pvc_claim: str = "gda-home"
    # GDA_K8S_MOUNT_PATH: GDA_HOME must lie under it, or artifacts would land on a pod's own disk and
    # vanish with it.
    mount_path: str = "/gda"
    # GDA_K8S_GPUS: GPUs requested by each step of a gpu-pool asset (requests and limits: Kubernetes
    # requires them equal for extended resources).
    gpus_per_step: int = 1
    # GDA_K8S_CPU, GDA_K8S_MEMORY: requests for every step pod (scheduling, not caps).
    cpu_request: str = "2"
    memory_request: str = "8Gi"
    # GDA_K8S_GPU_NODE_SELECTOR ("key=value,key=value"): only GPU steps; CPU steps may run anywhere.
    gpu_node_selector: Mapping[str, str] = field(default_factory=dict)
    # GDA_K8S_GPU_TOLERATIONS (a JSON list of Kubernetes tolerations): only GPU steps.
    gpu_tolerations: tuple[Mapping[str, Any], ...] = DEFAULT_GPU_TOLERATIONS

    def __post_init__(self) -> None:
        if self.gpus_per_step < 1:
            raise ValueError(f"GDA_K8S_GPUS must be at least 1 (got {self.gpus_per_step})")
        if not Path(self.mount_path).is_absolute():
            raise ValueError(f"GDA_K8S_MOUNT_PATH must be an absolute path (got {self.mount_path!r})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "K8sSettings":
        defaults = cls()
        selector = environ.get("GDA_K8S_GPU_NODE_SELECTOR", "")
        tolerations = environ.get("GDA_K8S_GPU_TOLERATIONS")
        return cls(
            image=environ.get("GDA_K8S_IMAGE") or None,
            pvc_claim=environ.get("GDA_K8S_PVC", defaults.pvc_claim),
            mount_path=environ.get("GDA_K8S_MOUNT_PATH", defaults.mount_path),
            gpus_per_step=int(environ.get("GDA_K8S_GPUS", defaults.gpus_per_step)),
            cpu_request=environ.get("GDA_K8S_CPU", defaults.cpu_request),
            memory_request=environ.get("GDA_K8S_MEMORY", defaults.memory_request),
            gpu_node_selector=_key_values(selector),
            gpu_tolerations=tuple(json.loads(tolerations)) if tolerations else defaults.gpu_tolerations,
        )


def _key_values(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"GDA_K8S_GPU_NODE_SELECTOR must be key=value[,key=value] (got {text!r})")
    return {key.strip(): value.strip() for key, value in pairs}


def gpu_op_names(assets: Iterable[Any]) -> list[str]:
    """The ops of every asset in the ``gpu`` pool: the steps that get a GPU."""
    return sorted(
        a.op.name for a in assets if isinstance(a, dg.AssetsDefinition) and a.is_executable and a.op.pool == "gpu"
    )


def executor_for(
    deployment: str | K8sSettings,
    home: Home,
    profile: str | None,
    shards: Path | None,
    assets: Iterable[Any],
) -> dg.ExecutorDefinition | None:
    """The executor of every job; None (Dagster's default) for ``local``. ``deployment`` is a name from
    ``DEPLOYMENTS`` (``k8s`` reads ``K8sSettings.from_env()``) or explicit ``K8sSettings``."""
    if isinstance(deployment, K8sSettings):
        settings = deployment
    elif deployment == LOCAL:
        return None
    elif deployment == K8S:
        settings = K8sSettings.from_env()
    else:
        raise ValueError(f"unknown deployment {deployment!r}; choose one of: {', '.join(DEPLOYMENTS)}")
    return k8s_executor(settings, home, profile, shards, gpu_op_names(assets))


def k8s_executor(
    settings: K8sSettings, home: Home, profile: str | None, shards: Path | None, gpu_ops: Iterable[str]
) -> dg.ExecutorDefinition:
    # Imported here: dagster-k8s is an extra (`k8s`), and a local install must load without it.
    from dagster_k8s import k8s_job_executor

    if not home.root.is_relative_to(settings.mount_path):
        raise ValueError(
            f"GDA_HOME {home.root} is not under the shared volume's mount path {settings.mount_path}; "
            "every pod must read and write the same home"
        )
    # A step pod loads the same code location: it must resolve the same home, profile and shards as the
    # process that built these definitions, whatever its own defaults are.
    env = {
        "GDA_DEPLOYMENT": K8S,
        "GDA_HOME": str(home.root),
        "GDA_PROFILE": resolve_profile(profile),
        "HF_HUB_OFFLINE": "1",
    }
    if shards is not None:
        env["GDA_SHARDS"] = str(shards)
    # The sd profile's model folders are read from the environment when the definitions load.
    env |= {name: os.environ[name] for name in SD_PATHS if os.environ.get(name)}
    cpu_memory = {"cpu": settings.cpu_request, "memory": settings.memory_request}
    gpus = str(settings.gpus_per_step)
    gpu_step: dict[str, Any] = {
        "container_config": {"resources": {"requests": {"nvidia.com/gpu": gpus}, "limits": {"nvidia.com/gpu": gpus}}},
        "pod_spec_config": {"tolerations": [dict(t) for t in settings.gpu_tolerations]},
    }
    if settings.gpu_node_selector:
        gpu_step["pod_spec_config"]["node_selector"] = dict(settings.gpu_node_selector)
    config: dict[str, Any] = {
        "env_vars": [f"{key}={value}" for key, value in env.items()],
        "volumes": [{"name": VOLUME_NAME, "persistentVolumeClaim": {"claimName": settings.pvc_claim}}],
        "volume_mounts": [{"name": VOLUME_NAME, "mountPath": settings.mount_path}],
        "resources": {"requests": cpu_memory},
        # Keyed by op name; merged (deep) over the settings above, so a GPU step keeps its CPU and memory.
        "per_step_k8s_config": {op: gpu_step for op in gpu_ops},
    }
    if settings.image:
        config["job_image"] = settings.image
    return k8s_job_executor.configured(config, name="k8s")
