"""The Kubernetes deployment, without a cluster: the Job that dagster-k8s's own step handler would submit for
one step of a GPU asset and of a DuckDB asset, built from the definitions ``GDA_DEPLOYMENT=k8s`` loads.

The k8s executor is created by its own creation function from the run config Dagster resolves for the
job, behind a ``K8sRunLauncher`` configured as the Helm chart configures it; only the Kubernetes API call
is replaced, so each test reads the ``V1Job`` body that would have been sent. Nothing here proves that a
cluster schedules it (GPU drivers, the PVC's access mode): that is a real cluster's test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import dagster as dg
import pytest
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
from dagster._core.execution.context_creation_job import create_context_free_log_manager
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster._core.test_utils import create_run_for_test
from dagster._grpc.types import ExecuteStepArgs
from dagster_k8s import k8s_job_executor
from dagster_k8s.client import DagsterKubernetesClient

from gda.home import Home
from gda_assets.deployment import VOLUME_NAME, K8sSettings, gpu_op_names
from gda_assets.factory import build_defs

ROOT = Path(__file__).resolve().parents[2]
HOME = Path("/gda/home")  # never created: building definitions and Job specs touches no file under it
SETTINGS = K8sSettings(
    image="registry.example/gda:test",
    pvc_claim="gda-shared",
    mount_path="/gda",
    gpus_per_step=2,
    cpu_request="3",
    memory_request="12Gi",
    gpu_node_selector={"cloud.example/accelerator": "h100"},
)
NAMESPACE = "gda"

# What the Helm chart passes to runs from the user deployment in docs/deployment.md
# (includeConfigInLaunchedRuns): the same volume and env as the executor adds, written the chart's way.
HELM_CONTAINER_CONTEXT = {
    "k8s": {
        "image_pull_policy": "Always",
        "env_config_maps": ["dagster-dagster-user-deployments-gda-user-env"],
        "volume_mounts": [{"name": VOLUME_NAME, "mountPath": "/gda"}],
        "volumes": [{"name": VOLUME_NAME, "persistentVolumeClaim": {"claimName": "gda-shared"}}],
        "namespace": NAMESPACE,
        "service_account_name": "dagster-dagster-user-deployments-user-deployments",
        "env": [
            {"name": "GDA_DEPLOYMENT", "value": "k8s"},
            {"name": "GDA_HOME", "value": str(HOME)},
            {"name": "GDA_PROFILE", "value": "tiny"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
        ],
    }
}


@pytest.fixture(scope="module")
def k8s_defs() -> dg.Definitions:
    return build_defs(home=Home(HOME), profile="tiny", deployment=SETTINGS)


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory):
    """An instance whose run launcher is the K8sRunLauncher as the chart's dagster.yaml configures it, with
    a kubeconfig that names a cluster nobody contacts."""
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: none\n"
        "clusters: [{name: none, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: none, user: {}}]\n"
        "contexts: [{name: none, context: {cluster: none, user: none, namespace: gda}}]\n"
    )
    launcher = {
        "load_incluster_config": False,
        "kubeconfig_file": str(kubeconfig),
        "job_namespace": NAMESPACE,
        "service_account_name": "dagster",
        "dagster_home": "/opt/dagster/dagster_home",
        "instance_config_map": "dagster-instance",
        "postgres_password_secret": "dagster-postgresql-secret",
    }
    with dg.instance_for_test(
        overrides={"run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher}}
    ) as instance:
        yield instance


def step_job(defs: dg.Definitions, instance, job_name: str, step_key: str, container_context=None):
    """The V1Job the k8s executor of ``job_name`` submits for ``step_key``."""
    job_def = (
        defs.resolve_implicit_global_asset_job_def() if job_name == "__ASSET_JOB" else defs.resolve_job_def(job_name)
    )
    # The executor config a run of this job gets: the definitions' executor with an empty run config.
    executor_config = ResolvedRunConfig.build(job_def, {}).execution.execution_engine_config
    executor = job_def.executor_def.executor_creation_fn(
        InitExecutorContext(
            job=InMemoryJob(job_def),
            executor_def=job_def.executor_def,
            executor_config=executor_config,
            instance=instance,
        )
    )
    batch_api = mock.MagicMock()
    handler = executor._step_handler  # noqa: SLF001
    handler._api_client = DagsterKubernetesClient.production_client(batch_api_override=batch_api)  # noqa: SLF001

    origin = JobPythonOrigin(
        job_name,
        RepositoryPythonOrigin(
            executable_path=sys.executable,
            code_pointer=ModuleCodePointer("gda_assets.definitions", "defs", working_directory=None),
            container_image="registry.example/gda:code-location",
            container_context=container_context,
        ),
    )
    run = create_run_for_test(instance, job_name=job_name, job_code_origin=origin)
    plan = create_execution_plan(job_def)
    plan_context = PlanOrchestrationContext(
        plan_data=PlanData(
            job=InMemoryJob(job_def),
            dagster_run=run,
            instance=instance,
            execution_plan=plan,
            raise_on_error=True,
            retry_mode=RetryMode.DISABLED,
        ),
        log_manager=create_context_free_log_manager(instance, run),
        executor=executor,
        output_capture=None,
    )
    context = StepHandlerContext(
        instance=instance,
        plan_context=plan_context,
        steps=plan.steps,
        execute_step_args=ExecuteStepArgs(origin, run.run_id, [step_key]),
        dagster_run=run,
    )
    list(handler.launch_step(context))
    [(method, _args, kwargs)] = batch_api.method_calls
    assert method == "create_namespaced_job" and kwargs["namespace"] == NAMESPACE
    return kwargs["body"]


def _env(container) -> dict[str, str]:
    names = [e.name for e in container.env]
    assert len(names) == len(set(names)), f"an env var is set twice: {sorted(names)}"
    return {e.name: e.value for e in container.env}


def _assert_shared_home(pod, container) -> None:
    volumes = [v for v in pod.volumes if v.name == VOLUME_NAME]
    assert len(volumes) == 1 and volumes[0].persistent_volume_claim.claim_name == "gda-shared"
    mounts = [m for m in container.volume_mounts if m.name == VOLUME_NAME]
    assert len(mounts) == 1 and mounts[0].mount_path == "/gda"
    env = _env(container)
    assert Path(env["GDA_HOME"]).is_relative_to(mounts[0].mount_path)
    assert env["GDA_HOME"] == str(HOME)
    assert env["GDA_PROFILE"] == "tiny"
    assert env["GDA_DEPLOYMENT"] == "k8s"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "GDA_SHARDS" not in env  # the embedded corpus: step pods must not switch to a shards folder


def _assert_gpu_step(job, op: str) -> None:
    pod = job.spec.template.spec
    [container] = pod.containers
    assert container.image == "registry.example/gda:test"
    assert container.resources.requests == {"cpu": "3", "memory": "12Gi", "nvidia.com/gpu": "2"}
    assert container.resources.limits == {"nvidia.com/gpu": "2"}
    assert pod.node_selector == {"cloud.example/accelerator": "h100"}
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    _assert_shared_home(pod, container)
    assert job.metadata.labels["dagster/op"] == op
    assert "execute_step" in container.args


@pytest.mark.parametrize(
    "container_context", [None, HELM_CONTAINER_CONTEXT], ids=["executor-only", "with-helm-context"]
)
def test_gpu_asset_step_requests_gpus_on_the_shared_home(k8s_defs, instance, container_context) -> None:
    _assert_gpu_step(step_job(k8s_defs, instance, "teacher_job", "abu_scores", container_context), "abu_scores")


def test_implicit_asset_job_gets_the_same_gpu_step(k8s_defs, instance) -> None:
    """Materializing from the UI, a backfill or the automation sensor runs the implicit asset job."""
    job = step_job(k8s_defs, instance, "__ASSET_JOB", "image_features", HELM_CONTAINER_CONTEXT)
    _assert_gpu_step(job, "image_features")


@pytest.mark.parametrize(
    "container_context", [None, HELM_CONTAINER_CONTEXT], ids=["executor-only", "with-helm-context"]
)
def test_duckdb_asset_step_gets_no_gpu(k8s_defs, instance, container_context) -> None:
    job = step_job(k8s_defs, instance, "ingest_job", "training_images", container_context)
    pod = job.spec.template.spec
    [container] = pod.containers
    assert container.image == "registry.example/gda:test"
    assert container.resources.requests == {"cpu": "3", "memory": "12Gi"}
    assert not container.resources.limits
    assert not pod.node_selector and not pod.tolerations
    _assert_shared_home(pod, container)


def test_defaults_use_the_code_location_image_and_pass_the_shards_folder(instance, monkeypatch) -> None:
    monkeypatch.setenv("GDA_SD_MODEL", "/gda/models/sd-v1-4")
    defs = build_defs(
        home=Home(HOME), profile="tiny", shards=Path("/gda/shards"), deployment=K8sSettings(pvc_claim="gda-shared")
    )
    job = step_job(defs, instance, "teacher_job", "abu_scores", HELM_CONTAINER_CONTEXT)
    [container] = job.spec.template.spec.containers
    assert container.image == "registry.example/gda:code-location"
    assert container.resources.requests == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert _env(container)["GDA_SHARDS"] == "/gda/shards"
    assert _env(container)["GDA_SD_MODEL"] == "/gda/models/sd-v1-4"  # the sd profile's folders reach every step


def test_every_gpu_pool_op_and_only_those_get_a_gpu(k8s_defs) -> None:
    asset_job = k8s_defs.resolve_implicit_global_asset_job_def()
    pools = {node.name: node.definition.pool for node in asset_job.nodes}
    config = ResolvedRunConfig.build(asset_job, {}).execution.execution_engine_config
    gpu_steps = {op for op, step in config["per_step_k8s_config"].items() if "nvidia.com/gpu" in str(step)}
    assert gpu_steps == {name for name, pool in pools.items() if pool == "gpu"}
    assert {"abu_scores", "image_features", "diffusion_model", "training_gradients", "counterfactual_eval"} <= gpu_steps
    assert {"training_images", "dino_candidates", "query_prompts", "attribution_index"}.isdisjoint(gpu_steps)
    assert gpu_op_names([]) == []


def test_every_job_runs_on_the_k8s_executor(k8s_defs) -> None:
    jobs = [*k8s_defs.resolve_all_job_defs(), k8s_defs.resolve_implicit_global_asset_job_def()]
    assert len(jobs) > 10
    for job in jobs:
        assert job.executor_def.executor_creation_fn is k8s_job_executor.executor_creation_fn, job.name


def test_local_deployment_is_unchanged(tmp_path: Path) -> None:
    default = build_defs(home=Home(tmp_path), profile="tiny")
    local = build_defs(home=Home(tmp_path), profile="tiny", deployment="local")
    for defs in (default, local):
        for job in [*defs.resolve_all_job_defs(), defs.resolve_implicit_global_asset_job_def()]:
            assert job.executor_def is dg.multi_or_in_process_executor, job.name


def test_bad_settings_fail_when_the_definitions_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown deployment 'k9s'"):
        build_defs(home=Home(tmp_path), profile="tiny", deployment="k9s")
    with pytest.raises(ValueError, match="not under the shared volume"):
        build_defs(home=Home(tmp_path), profile="tiny", deployment=SETTINGS)
    with pytest.raises(ValueError, match="GDA_K8S_GPUS"):
        K8sSettings(gpus_per_step=0)


def test_settings_from_env() -> None:
    settings = K8sSettings.from_env(
        {
            "GDA_K8S_IMAGE": "registry.example/gda:1",
            "GDA_K8S_PVC": "claim",
            "GDA_K8S_MOUNT_PATH": "/mnt/gda",
            "GDA_K8S_GPUS": "4",
            "GDA_K8S_CPU": "8",
            "GDA_K8S_MEMORY": "64Gi",
            "GDA_K8S_GPU_NODE_SELECTOR": "pool=gpu, zone=a",
            "GDA_K8S_GPU_TOLERATIONS": json.dumps(
                [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
            ),
        }
    )
    assert settings == K8sSettings(
        image="registry.example/gda:1",
        pvc_claim="claim",
        mount_path="/mnt/gda",
        gpus_per_step=4,
        cpu_request="8",
        memory_request="64Gi",
        gpu_node_selector={"pool": "gpu", "zone": "a"},
        gpu_tolerations=({"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},),
    )
    assert K8sSettings.from_env({}) == K8sSettings()


def _load_code_location(env: dict[str, str]) -> str:
    code = (
        "import sys; from gda_assets.definitions import defs; "
        "job = defs.resolve_implicit_global_asset_job_def(); "
        "print(job.executor_def.name, 'dagster_k8s' in sys.modules)"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GDA_")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split("\n")[-2]


def test_code_location_reads_gda_deployment(tmp_path: Path) -> None:
    """``GDA_DEPLOYMENT`` picks the executor; unset, nothing imports dagster-k8s (an install without the
    ``k8s`` extra keeps working)."""
    assert (
        _load_code_location({"GDA_HOME": str(tmp_path), "GDA_PROFILE": "tiny"}) == "multi_or_in_process_executor False"
    )
    k8s = {"GDA_HOME": "/gda/home", "GDA_PROFILE": "tiny", "GDA_DEPLOYMENT": "k8s", "OMP_NUM_THREADS": "1"}
    assert _load_code_location(k8s) == "k8s True"
