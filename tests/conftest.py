"""Fixtures of every test: no network, one torch thread, the query service's served home, and the tiny demo's
materialized home."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Set before torch loads OpenMP, for this process and every gda / Dagster process a test starts: idle OpenMP
# threads sleep instead of spinning, which on a 2-core machine running a server and its client side by side
# otherwise starves the other process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if TYPE_CHECKING:
    from servicekit import ServedHome

    from gda.encoders import ImageEncoder, TextEncoder
    from gda.home import Home

# Test helpers (shardkit, sdkit) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


# Tests never touch the network: any hub lookup must fail fast instead of hanging.
@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _encoder_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Encoders' exported ONNX graphs go to this session's scratch folder (and that of every process a test
    starts), not the user's ~/.cache."""
    os.environ["GDA_CACHE_DIR"] = str(tmp_path_factory.mktemp("gda-cache"))


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from a second thread, and spin-waiting threads on a busy 2-core machine
    made them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The query service's fixtures (tests/unit and tests/browser): the tiny profile's encoders and a served home
# built with them. They import inside, so that test runs without them do not load the model libraries.
@pytest.fixture(scope="session")
def tiny_encoders() -> tuple[ImageEncoder, TextEncoder]:
    from gda.encoders import EncoderSpec, load_image_encoder, load_text_encoder
    from gda.profiles import profile_values

    spec = EncoderSpec(**profile_values("tiny")["encoders"])
    return load_image_encoder(spec), load_text_encoder(spec)


@pytest.fixture(scope="session")
def served_home(
    tmp_path_factory: pytest.TempPathFactory, tiny_encoders: tuple[ImageEncoder, TextEncoder]
) -> ServedHome:
    from servicekit import build_served_home

    return build_served_home(tmp_path_factory.mktemp("served_home"), *tiny_encoders)


# The tiny demo, materialized once per session (minutes): tests/e2e asserts on its rows and files, and
# tests/browser looks at it in the Dagster UI. Tests that rewrite it must leave the asserted data as it was.
# Under pytest-xdist the first worker to need it builds it in the session's shared folder while the others
# wait on a lock, and each worker gets its own copy: DuckDB lets one process write a database file, and a
# worker rewriting its home must not race another's assertions.
@pytest.fixture(scope="session")
def demo_home(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Home:
    from gda.cli import main
    from gda.home import Home

    own = worker_id == "master"
    shared = tmp_path_factory.getbasetemp() if own else tmp_path_factory.getbasetemp().parent
    built = Home(shared / "demo-home")
    with open(shared / "demo-home.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "demo-home.done").exists():
            assert main(["demo", "--home", str(built.root), "--profile", "tiny"]) == 0
            (shared / "demo-home.done").touch()
    if own:
        return built
    home = Home(tmp_path_factory.mktemp("home") / "home")
    shutil.copytree(built.root, home.root, symlinks=True)
    return home
