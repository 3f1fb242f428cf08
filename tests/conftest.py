"""Test set-up: no network, no telemetry; tiny random backbones from tests/tiny.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Read once at import by huggingface_hub: set before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Outside CI, tests share the 2 cores with training runs and other work: one thread per test
# process (and its subprocesses) avoids OpenMP oversubscription, which is far slower than one
# thread. CI (CI=true) uses the default. NLA_TEST_THREADS overrides both.
_threads = os.environ.get("NLA_TEST_THREADS") or ("" if os.environ.get("CI") == "true" else "1")
if _threads:
    os.environ["OMP_NUM_THREADS"] = _threads
    os.environ["MKL_NUM_THREADS"] = _threads

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

import tiny  # noqa: E402

if _threads:
    import torch  # noqa: E402

    torch.set_num_threads(int(_threads))

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave files for people to look at (screenshots, plots)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session", params=["llama", "qwen2", "gemma2"])
def tiny_backbone(request):
    return tiny.make_backbone(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny.make_backbone("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded backbone (converted once into the user cache)."""
    from nla_space.backbone import shared_backbone

    return shared_backbone("embedded:smollm2-135m-instruct")
