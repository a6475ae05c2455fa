import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Test helpers (shardkit, sdkit) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


# Tests never touch the network: any hub lookup must fail fast instead of hanging.
@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from a second thread, and spin-waiting threads on a busy 2-core machine
    made them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
