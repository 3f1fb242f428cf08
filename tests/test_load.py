"""Load: the real app (``python app.py``, real embedded backbone) on 127.0.0.1 under a bounded burst
of concurrent ``/verbalize`` API clients (gradio_client, one thread per client), valid and invalid
requests mixed.

Checked: every valid request is answered with the JSON contract (and equals the answer to the same
request made alone: no cross-talk between concurrent requests); every invalid one is refused with
its reason; none is lost or times out; the server is still serving afterwards. Measured and written
to ``test-artifacts/load.json``: latency p50/p90/p99 (valid and invalid), throughput, the server's
peak RSS (``VmHWM``) and RSS over time, the queue settings, and the machine's load.

Default run: 6 clients × 2–3 requests (``-m e2e``). ``-m slow``: 30 clients × 2–3 requests.
Requests use best-of-K with K=2 (seed-dependent answers, so cross-talk would show) and the app runs
with ``NLA_SPACE_MAX_NEW_TOKENS=16`` so a burst finishes on a shared CPU; a request's time grows
about linearly with both.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACT_KEYS = {"card", "layer", "k", "tau", "trained", "greedy", "temperature", "seed", "centered", "hedged",
                 "score", "best_index", "best", "candidates", "timings", "notes"}
TEXTS = [
    "The Eiffel Tower is in Paris, the capital of France.",
    "Water boils at a lower temperature at high altitude.",
    "She opened the old wooden door and stepped into the garden.",
    "def add(a, b): return a + b",
    "Le chat dort sur le canapé.",
    "Interest rates rose for the third time this year.",
]
#: (params, a fragment of the refusal message)
INVALID = [
    (dict(text=""), "empty"),
    (dict(text=TEXTS[0], k=0), "k must be"),
    (dict(text=TEXTS[0], card="no-such-card"), "unknown card"),
    (dict(text=TEXTS[0], layer=4), "supports layer"),
    (dict(text=TEXTS[0], tau=2.0), "tau"),
    (dict(text="x" * 5000), "characters long"),
]
K = 2
MAX_NEW_TOKENS = 16
HEAD_K = 16  # the slow valid request that keeps the worker busy while invalid ones arrive
#: Sampled decoding (the default card decodes greedily): K candidates that depend on the seed, so an
#: answer mixed up with another request's would show.
STRATEGY = "best-of-k"
LAYER = 13  # the default card's layer
CONCURRENCY = 1
QUEUE_SIZE = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vm(pid: int, key: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of a process, in KiB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_mb(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        kib = _vm(pid, "VmRSS")
        return None if kib is None else kib / 1024
    except Exception:  # the process is gone
        return None


class Server:
    """``python app.py`` on 127.0.0.1:PORT in its own process; stopped (and reaped) by :meth:`stop`."""

    def __init__(self, log: Path, concurrency: int = CONCURRENCY) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ)
        env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(self.port), GRADIO_ANALYTICS_ENABLED="False",
                   HF_HUB_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), NLA_SPACE_PRELOAD="embedded",
                   NLA_SPACE_MAX_NEW_TOKENS=str(MAX_NEW_TOKENS), NLA_SPACE_CONCURRENCY=str(concurrency),
                   NLA_SPACE_QUEUE_SIZE=str(QUEUE_SIZE), PYTHONUNBUFFERED="1")
        self.log = log
        self._log_f = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=self._log_f, stderr=subprocess.STDOUT)
        self.samples: list[tuple[float, float]] = []
        self._stop_sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def wait_ready(self, timeout: float = 300) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=5) as r:
                    if r.status == 200:
                        self._sampler.start()
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"app.py not serving after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def _sample(self) -> None:
        t0 = time.monotonic()
        while not self._stop_sampling.wait(0.25):
            rss = _rss_mb(self.proc.pid)
            if rss is None:
                return
            self.samples.append((round(time.monotonic() - t0, 2), round(rss, 1)))

    def peak_rss_mb(self) -> float | None:
        hwm = _vm(self.proc.pid, "VmHWM")  # the kernel's own peak: nothing between samples is missed
        if hwm is not None:
            return round(hwm / 1024, 1)
        return max((s[1] for s in self.samples), default=None)

    def stop(self) -> None:
        self._stop_sampling.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log_f.close()


@dataclass
class Outcome:
    client: int
    kind: str  #: "valid" | "invalid"
    params: dict[str, Any]
    latency_s: float = 0.0
    result: dict[str, Any] | None = None
    error: str | None = None
    expected: str | None = None
    problems: list[str] = field(default_factory=list)


def _plan(n_clients: int) -> list[list[tuple[str, dict[str, Any], str | None]]]:
    """Per client: a valid request, an invalid one, and (every third client) a second valid one.
    Valid requests repeat a few (text, seed) pairs so that answers can be compared across clients."""
    plans = []
    for i in range(n_clients):
        text = TEXTS[i % len(TEXTS)]
        seed = i % 3
        reqs = [("valid", dict(text=text, k=K, strategy=STRATEGY, seed=seed), None)]
        bad, msg = INVALID[i % len(INVALID)]
        reqs.append(("invalid", dict(bad), msg))
        if i % 3 == 0:
            reqs.append(("valid", dict(text=TEXTS[(i + 1) % len(TEXTS)], k=K, strategy=STRATEGY, seed=1), None))
        if i % 2:
            reqs.reverse()
        plans.append(reqs)
    return plans


def _client_thread(url: str, i: int, reqs, timeout: float, out: list[Outcome], start: threading.Barrier) -> None:
    from gradio_client import Client

    try:
        client = Client(url, verbose=False, analytics_enabled=False)
    except Exception as exc:  # noqa: BLE001 - recorded and asserted on
        out.extend(Outcome(i, kind, p, error=f"client failed to connect: {exc!r}", expected=m, problems=["connect"])
                   for kind, p, m in reqs)
        start.abort()
        return
    try:
        start.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    for kind, params, msg in reqs:
        o = Outcome(i, kind, params, expected=msg)
        t0 = time.monotonic()
        try:
            o.result = client.submit(api_name="/verbalize", **params).result(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - AppError for refusals; anything else is a problem
            o.error = f"{type(exc).__name__}: {exc}"
        o.latency_s = time.monotonic() - t0
        out.append(o)


def _check(o: Outcome, reference: dict[tuple[str, int], dict[str, Any]]) -> None:
    if o.kind == "invalid":
        if o.result is not None:
            o.problems.append("an invalid request was answered")
        elif not (o.error or "").startswith("ValidationError") or o.expected not in o.error:
            o.problems.append(f"not refused with its reason: {o.error}")
        return
    r = o.result
    if r is None:
        o.problems.append(f"no answer: {o.error}")
        return
    if not CONTRACT_KEYS <= set(r):
        o.problems.append(f"missing keys {CONTRACT_KEYS - set(r)}")
        return
    if r["k"] != K or len(r["candidates"]) != K or r["seed"] != o.params["seed"] or r["layer"] != LAYER:
        o.problems.append("k/seed/layer/candidates do not match the request")
    if r["best"] != r["candidates"][r["best_index"]] or r["hedged"] != (r["score"] < r["tau"]):
        o.problems.append("best/hedged inconsistent")
    ref = reference.get((o.params["text"], o.params["seed"]))
    if ref is not None and (r["best"] != ref["best"] or r["candidates"] != ref["candidates"]):
        o.problems.append("differs from the same request made alone (cross-talk?)")


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo), 3)


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), "p50_s": _pct(xs, 50), "p90_s": _pct(xs, 90), "p99_s": _pct(xs, 99),
            "max_s": round(max(xs), 3) if xs else None, "mean_s": round(sum(xs) / len(xs), 3) if xs else None}


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def _refusal_kind(exc: Exception) -> str:
    msg = str(exc)
    if "queue" in msg.lower() and "full" in msg.lower():
        return "queue_full"
    return "refused" if type(exc).__name__ == "ValidationError" else "other"


def invalid_while_busy(client: Any, n: int, timeout: float, workers: int = 1) -> dict[str, Any]:
    """Slow valid requests occupy the workers; then ``n`` invalid ones arrive at once. Each must be
    refused with its reason on arrival (a validation error, not a queue slot): every refusal comes
    back before the valid requests finish."""
    t0 = time.monotonic()
    heads = [client.submit(api_name="/verbalize", text=TEXTS[0], k=HEAD_K, strategy=STRATEGY, seed=i) for i in range(workers)]
    time.sleep(0.5)  # the heads are running
    jobs = [(client.submit(api_name="/verbalize", **dict(INVALID[i % len(INVALID)][0])), time.monotonic()) for i in range(n)]
    counts = {"refused": 0, "queue_full": 0, "other": 0}
    latencies, others = [], []
    for j, sent_at in jobs:
        try:
            j.result(timeout=timeout)
            counts["other"] += 1
            others.append("answered")
        except Exception as exc:  # noqa: BLE001
            counts[_refusal_kind(exc)] += 1
            latencies.append(time.monotonic() - sent_at)
            if _refusal_kind(exc) == "other":
                others.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    refused_by = time.monotonic() - t0
    head_ok = all(CONTRACT_KEYS <= set(h.result(timeout=timeout)) for h in heads)
    heads_done = time.monotonic() - t0
    return {"submitted_invalid": n, "workers_busy": workers, **counts, "all_refused_at_s": round(refused_by, 3),
            "heads_done_at_s": round(heads_done, 3), "invalid_latency": _stats(latencies), "head_answered": head_ok,
            "other_examples": others[:5]}


def overflow(client: Any, n: int, timeout: float) -> dict[str, Any]:
    """A slow valid request occupies the worker; then ``n`` cheap valid ones (greedy, one token) arrive at
    once: those beyond the queue's size are refused as "queue full", the rest answered; none lost."""
    head = client.submit(api_name="/verbalize", text=TEXTS[1], k=HEAD_K, strategy=STRATEGY, seed=0)
    time.sleep(0.5)
    jobs = [client.submit(api_name="/verbalize", text=TEXTS[i % len(TEXTS)], greedy=True, max_new_tokens=1, seed=i)
            for i in range(n)]
    counts = {"answered": 0, "queue_full": 0, "refused": 0, "other": 0}
    others = []
    for j in jobs:
        try:
            counts["answered" if CONTRACT_KEYS <= set(j.result(timeout=timeout)) else "other"] += 1
        except Exception as exc:  # noqa: BLE001
            counts[_refusal_kind(exc)] += 1
            if _refusal_kind(exc) != "queue_full":
                others.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    head_ok = CONTRACT_KEYS <= set(head.result(timeout=timeout))
    return {"submitted": n, **counts, "head_answered": head_ok, "other_examples": others[:5]}


def run_burst(n_clients: int, artifacts: Path, variant: str, concurrency: int = CONCURRENCY,
              overflow_n: int = QUEUE_SIZE + 8) -> dict[str, Any]:
    from gradio_client import Client

    server = Server(artifacts / f"load-{variant}-server.log", concurrency)
    try:
        startup_s = server.wait_ready()
        rss_idle = _rss_mb(server.proc.pid)
        solo = Client(server.url, verbose=False, analytics_enabled=False)
        # The reference answers, one request at a time (also warms the model up).
        reference: dict[tuple[str, int], dict[str, Any]] = {}
        solo_latency = []
        plans = _plan(n_clients)
        for kind, p, _ in (r for plan in plans for r in plan):
            if kind == "valid" and (p["text"], p["seed"]) not in reference and len(reference) < 3:
                t0 = time.monotonic()
                reference[(p["text"], p["seed"])] = solo.predict(api_name="/verbalize", **p)
                solo_latency.append(time.monotonic() - t0)
        per_request = max(solo_latency)
        rss_warm = _rss_mb(server.proc.pid)  # after the first requests: torch/gradio warm-up is done
        n_valid = sum(kind == "valid" for plan in plans for kind, _, _ in plan)
        timeout = 120 + 4 * per_request * n_valid  # worst case: every valid request queued ahead, ×4 slack
        load_before = _machine()

        outcomes: list[Outcome] = []
        lock = threading.Lock()
        start = threading.Barrier(n_clients)
        per_thread: list[list[Outcome]] = [[] for _ in range(n_clients)]
        threads = [threading.Thread(target=_client_thread, args=(server.url, i, plans[i], timeout, per_thread[i], start), daemon=True)
                   for i in range(n_clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout * 3 + 300)
        wall = time.monotonic() - t0
        alive = [i for i, t in enumerate(threads) if t.is_alive()]
        with lock:
            for chunk in per_thread:
                outcomes.extend(chunk)
        for o in outcomes:
            _check(o, reference)

        busy = invalid_while_busy(solo, len(INVALID) * 2, timeout, concurrency)
        over = overflow(solo, overflow_n, timeout) if overflow_n else None
        # Still serving afterwards: the page config and a fresh request.
        with urllib.request.urlopen(server.url + "config", timeout=30) as r:
            page_ok = r.status == 200
        after = solo.predict(api_name="/verbalize", text="Still serving after the burst?", k=K, strategy=STRATEGY, seed=0)
        after_ok = CONTRACT_KEYS <= set(after) and len(after["candidates"]) == K
        peak = server.peak_rss_mb()
        rss_end = _rss_mb(server.proc.pid)
        refused_at_queue = sum(1 for o in outcomes if o.error and "queue" in o.error.lower() and "full" in o.error.lower())
    finally:
        server.stop()

    sent = sum(len(p) for p in plans)
    valid = [o for o in outcomes if o.kind == "valid"]
    invalid = [o for o in outcomes if o.kind == "invalid"]
    report = {
        "variant": variant,
        "measured_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "machine_before": load_before,
        "machine_after": _machine(),
        "server": {"command": "python app.py", "card": "embedded (Gemma-3-270M, L13)", "strategy": STRATEGY, "device": "cpu",
                   "NLA_SPACE_CONCURRENCY": concurrency, "NLA_SPACE_QUEUE_SIZE": QUEUE_SIZE,
                   "NLA_SPACE_MAX_NEW_TOKENS": MAX_NEW_TOKENS, "K": K, "startup_s": round(startup_s, 2)},
        "clients": n_clients,
        "requests": {"sent": sent, "answered_or_refused": len(outcomes), "lost": sent - len(outcomes),
                     "valid": len(valid), "invalid": len(invalid), "refused_queue_full": refused_at_queue,
                     "problems": sum(bool(o.problems) for o in outcomes), "threads_still_running": len(alive)},
        "solo_latency_s": [round(x, 3) for x in solo_latency],
        "latency_valid": _stats([o.latency_s for o in valid if not o.problems]),
        "latency_invalid": _stats([o.latency_s for o in invalid if not o.problems]),
        "burst_wall_s": round(wall, 2),
        "throughput_valid_per_min": round(60 * sum(1 for o in valid if not o.problems) / wall, 2) if wall else None,
        "server_time_per_valid_s": round(wall / max(len(valid), 1), 3),
        "rss_mb": {"idle_after_start": round(rss_idle, 1) if rss_idle else None,
                   "after_3_solo_requests": round(rss_warm, 1) if rss_warm else None, "peak_vmhwm": peak,
                   "end": round(rss_end, 1) if rss_end else None,
                   "samples_every_0.25s": server.samples[:: max(1, len(server.samples) // 200)]},
        "invalid_while_busy": busy,
        "queue_overflow": over,
        "still_serving_after": bool(page_ok and after_ok),
        "problem_examples": [{"client": o.client, "kind": o.kind, "params": {k: (v[:40] if isinstance(v, str) else v) for k, v in o.params.items()},
                              "problems": o.problems, "error": (o.error or "")[:300]} for o in outcomes if o.problems][:10],
    }
    out = artifacts / "load.json"
    existing = {}
    if out.is_file():
        try:
            existing = json.loads(out.read_text())
        except json.JSONDecodeError:
            existing = {}
    existing[variant] = report
    from nla_space.io import atomic_write_json

    atomic_write_json(out, existing)
    return report


def _assert_report(rep: dict[str, Any]) -> None:
    req = rep["requests"]
    assert req["threads_still_running"] == 0, rep
    assert req["lost"] == 0 and req["answered_or_refused"] == req["sent"], rep
    assert req["problems"] == 0, rep["problem_examples"]
    assert rep["still_serving_after"], rep
    assert rep["latency_valid"]["n"] == req["valid"] and rep["latency_invalid"]["n"] == req["invalid"]
    busy = rep["invalid_while_busy"]
    # invalid requests are refused on arrival, with their reason, never queued behind valid ones
    assert busy["refused"] == busy["submitted_invalid"] and busy["head_answered"], busy
    assert busy["all_refused_at_s"] < busy["heads_done_at_s"], busy
    over = rep["queue_overflow"]
    if over:
        assert over["other"] == 0 and over["refused"] == 0 and over["head_answered"], over
        assert over["answered"] + over["queue_full"] == over["submitted"], over
        assert over["queue_full"] >= 1, over  # the bound is enforced, with its own message


@pytest.mark.e2e
def test_a_burst_of_clients_is_served_correctly(artifacts_dir: Path) -> None:
    rep = run_burst(6, artifacts_dir, "default")
    _assert_report(rep)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_heavy_burst_of_clients_is_served_correctly(artifacts_dir: Path) -> None:
    rep = run_burst(30, artifacts_dir, "heavy")
    _assert_report(rep)
    # queue settings: 30 clients with one request outstanding each fit the 32-slot queue
    assert rep["requests"]["refused_queue_full"] == 0


@pytest.mark.slow
@pytest.mark.e2e
def test_a_heavy_burst_with_two_workers_for_comparison(artifacts_dir: Path) -> None:
    """The same burst with ``NLA_SPACE_CONCURRENCY=2``: correctness must hold (per-request generators,
    no shared state); throughput and memory go to load.json to justify the default of 1."""
    rep = run_burst(30, artifacts_dir, "heavy-concurrency2", concurrency=2)
    _assert_report(rep)
