"""The model side of the app: which cards exist, opening them once, and the one GPU function.

Nothing here imports Gradio. The GPU function :func:`run_verbalize` is decorated with
``spaces.GPU`` (through :mod:`nla_space.ui.gpu`), takes and returns only picklable CPU data (strings,
numbers, lists, dicts), and reads the opened cards from a module-level registry filled in the main
process, so that on ZeroGPU the forked GPU worker inherits the loaded weights (https://huggingface.co/docs/hub/spaces-zerogpu).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from ..cards import DEFAULT_CARD, Card, builtin_cards, find_card
from ..errors import NLAInputError
from ..policy import MAX_K, MAX_NEW_TOKENS
from .gpu import default_device, gpu
from .heat import token_heat, token_layer_grid

if TYPE_CHECKING:  # the opened-card interface, for annotations only (importing it loads the model stack)
    from ..verbalizers.base import OpenedCard

log = logging.getLogger(__name__)

#: Longest input text the app accepts, in characters (the backbone's token limit applies too).
MAX_TEXT_CHARS = int(os.environ.get("NLA_SPACE_MAX_CHARS", "4000"))
#: Largest K the app accepts (the CLI goes to policy.MAX_K); keeps one request to seconds or minutes.
APP_MAX_K = max(1, min(MAX_K, int(os.environ.get("NLA_SPACE_MAX_K", "64"))))
#: Longest rollout (new tokens per candidate) the app generates; a request's time grows with it.
APP_MAX_NEW_TOKENS = max(1, min(MAX_NEW_TOKENS, int(os.environ.get("NLA_SPACE_MAX_NEW_TOKENS", "64"))))
#: Longest GPU reservation requested on ZeroGPU, in seconds.
MAX_GPU_SECONDS = int(os.environ.get("NLA_SPACE_MAX_GPU_SECONDS", "120"))

_OPEN: dict[str, OpenedCard] = {}  # card id -> opened card, filled in the main process only
_OPEN_LOCK = threading.Lock()
_FAILED: dict[str, str] = {}  # card id -> last error message (shown in the picker)


@dataclass(frozen=True)
class CardOption:
    id: str
    title: str
    layers: tuple[int, ...]
    local: bool  #: its files ship with the app (no download)
    label: str


def _is_cached(card: Card) -> bool:
    repo = card.av.repo
    if not repo:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "config.json", revision=card.av.revision)
        return isinstance(hit, str)
    except Exception:  # an old or odd hub client: treat as not cached
        return False


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def card_options() -> list[CardOption]:
    """Every built-in card, the embedded one first, labelled with whether it needs a download."""
    out = []
    for c in builtin_cards():
        local = c.local_folder is not None
        if local or c.id in _OPEN:
            note = ""
        elif c.id in _FAILED:
            note = " (unavailable here)"
        elif _is_cached(c):
            note = " (cached)"
        else:
            note = " (requires download)"
        label = f"{c.aliases[0] if c.aliases else c.id} · {c.backbone_id.split(':')[-1]} · L{c.default_layer}{note}"
        out.append(CardOption(c.id, c.title, tuple(c.layers), local, label))
    out.sort(key=lambda o: (not o.local, o.id))
    return out


def default_card_id() -> str:
    return find_card(DEFAULT_CARD).id


def card_layers(name: str | None) -> list[int]:
    return list(find_card(name).layers)


def get_open(name: str | None) -> OpenedCard:
    """The opened card (loaded once per process). Raises NLAInputError/CheckpointError with a readable message."""
    card = find_card(name)
    with _OPEN_LOCK:
        if card.id in _OPEN:
            return _OPEN[card.id]
        from ..backbone import requested_dtype
        from ..runtime import open_card

        t0 = time.perf_counter()
        try:
            device = default_device()
            oc = open_card(card, device=device, dtype=requested_dtype(None, device))  # NLA_CPU_DTYPE on CPU
        except NLAInputError as exc:
            _FAILED[card.id] = str(exc)
            raise
        _FAILED.pop(card.id, None)
        _OPEN[card.id] = oc
        log.info("opened card %s in %.1f s (trained=%s)", card.id, time.perf_counter() - t0, oc.trained)
        return oc


def preload(names: list[str] | None = None) -> None:
    """Open cards at import time (module level, as ZeroGPU wants); failures are logged, not raised."""
    env = os.environ.get("NLA_SPACE_PRELOAD")
    names = names if names is not None else [n.strip() for n in (env or DEFAULT_CARD).split(",") if n.strip()]
    for name in names:
        try:
            get_open(name)
        except NLAInputError as exc:
            log.warning("could not preload card %s: %s", name, exc)


# ------------------------------------------------------------------------------------------------
# Request checking (the messages a visitor sees)


def _as_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or value is None:
        raise NLAInputError(f"{name} must be an integer from {lo} to {hi}, got {value!r}", field=name)
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise NLAInputError(f"{name} must be an integer from {lo} to {hi}, got {value!r}", field=name) from None
    if not math.isfinite(f) or f != int(f) or not lo <= int(f) <= hi:
        raise NLAInputError(f"{name} must be an integer from {lo} to {hi}, got {value!r}", field=name)
    return int(f)


def _as_float(name: str, value: Any, lo: float, hi: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise NLAInputError(f"{name} must be a number in [{lo}, {hi}], got {value!r}", field=name) from None
    if isinstance(value, bool) or not math.isfinite(f) or not lo <= f <= hi:
        raise NLAInputError(f"{name} must be a number in [{lo}, {hi}], got {value!r}", field=name)
    return f


@dataclass
class Request:
    card: str
    text: str
    layer: int | None
    k: int
    tau: float | None
    temperature: float
    seed: int | None
    greedy: bool
    max_new_tokens: int | None  #: None: the card's default, capped at APP_MAX_NEW_TOKENS
    position: int | None = None  #: the token read (None: the card's read position, the last); see nla_space.activations
    strategy: str | None = None  #: None: the card's default (:data:`nla_space.policy.STRATEGIES`)


def check_request(
    text: Any,
    card: Any = None,
    layer: Any = None,
    k: Any = None,
    tau: Any = None,
    temperature: Any = 1.0,
    seed: Any = 0,
    greedy: Any = False,
    max_new_tokens: Any = None,
    strategy: Any = None,
    position: Any = None,
    k_is_slider: bool = False,
) -> Request:
    """Normalise and check one request; raise :class:`NLAInputError` with a readable message.

    ``k`` None is :data:`~nla_space.policy.DEFAULT_K` for a sampling strategy and 1 for greedy; an
    explicit K > 1 with greedy decoding is refused (:func:`~nla_space.policy.resolve_decoding`), except
    from the Verbalize tab's K slider (``k_is_slider``), which always holds a value and says it is
    used by best-of-K and guided only. From those sliders, τ at the card's ``default_tau`` (where the
    card change puts it) means the card's own τ at each layer (``None``): a card calibrated per layer
    has a τ per layer, and a sweep must not hedge every layer by the default layer's."""
    if not isinstance(text, str) or not text.strip():
        raise NLAInputError("the text is empty: type something to verbalize", field="text")
    if len(text) > MAX_TEXT_CHARS:
        raise NLAInputError(f"the text is {len(text)} characters long; this app accepts up to {MAX_TEXT_CHARS}", field="text")
    if card is not None and not isinstance(card, str):
        raise NLAInputError(f"card must be a card id or alias, got {card!r}", field="card")
    try:
        found = find_card(card or None)  # unknown card -> NLAInputError listing the known ones
    except NLAInputError as exc:
        raise NLAInputError(str(exc), field="card") from exc
    layer_i = None if layer in (None, "") else _as_int("layer", layer, 0, 10_000)
    strategy_v = _as_strategy(strategy, bool(greedy))
    if layer_i is not None and layer_i not in found.layers:
        raise NLAInputError(f"card {found.id} supports layer(s) {found.layers}, not {layer_i}", field="layer")
    return Request(
        card=found.id,
        text=text,
        layer=layer_i,
        k=_resolved_k(found, k, strategy_v, bool(greedy), k_is_slider),
        tau=None if tau in (None, "") or (k_is_slider and _as_float("tau", tau, 0.0, 1.0) == found.default_tau)
        else _as_float("tau", tau, 0.0, 1.0),
        temperature=_as_float("temperature", temperature, 0.0, 5.0),
        seed=None if seed in (None, "") else _as_int("seed", seed, 0, 2**63 - 1),
        greedy=bool(greedy),
        max_new_tokens=None if max_new_tokens in (None, "") else _as_int("max_new_tokens", max_new_tokens, 1, APP_MAX_NEW_TOKENS),
        strategy=strategy_v,
        position=None if position in (None, "") else _as_int("position", position, -MAX_TEXT_CHARS, MAX_TEXT_CHARS),
    )


def _resolved_k(card: Card, k: Any, strategy: str | None, greedy: bool, k_is_slider: bool) -> int:
    """The request's K (:func:`check_request`): checked, defaulted, refused when greedy would drop it."""
    from ..policy import resolve_decoding

    k_i = None if k in (None, "") else _as_int("k", k, 1, APP_MAX_K)
    if k_is_slider and resolve_decoding(strategy, greedy, card.default_strategy, None)[0] == "greedy":
        k_i = None
    return resolve_decoding(strategy, greedy, card.default_strategy, k_i)[1]


def _as_strategy(value: Any, greedy: bool) -> str | None:
    """``None``/``""``/``"default"``: the card's default; else one of the strategies (greedy must agree)."""
    from ..policy import STRATEGIES
    from ..policy import resolve_strategy

    if value in (None, "", "default"):
        return "greedy" if greedy else None
    if not isinstance(value, str) or value not in STRATEGIES:
        raise NLAInputError(f"strategy must be one of default, {', '.join(STRATEGIES)}, got {value!r}", field="strategy")
    return resolve_strategy(value, greedy, value)


# ------------------------------------------------------------------------------------------------
# The GPU function


def _rollout_seconds(k: int, greedy: bool, max_new_tokens: int | None) -> int:
    """Estimated seconds of sampling and scoring for one layer, grown with K and the rollout length."""
    n = 1 if greedy else int(k)
    max_new_tokens = APP_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    return math.ceil(n * max_new_tokens / 64)


def gpu_seconds(card_id: str, text: str, layer: int | None, k: int, tau: float | None, temperature: float,
                seed: int | None, greedy: bool = False, max_new_tokens: int | None = None, strategy: str | None = None,
                position: int | None = None, maps: bool = True, progress: Any = None) -> int:
    """ZeroGPU reservation for one request, sized by K (same signature as :func:`run_verbalize`; the token
    maps' forwards, two per grid layer, are within the 15 s base)."""
    return int(min(MAX_GPU_SECONDS, 15 + _rollout_seconds(k, greedy, max_new_tokens)))


def sweep_gpu_seconds(card_id: str, text: str, layers: list[int] | None, k: int, tau: float | None, temperature: float,
                      seed: int | None, greedy: bool = False, max_new_tokens: int | None = None, strategy: str | None = None,
                      progress: Any = None) -> int:
    """ZeroGPU reservation for a layer sweep: one layer's share times the layers swept (same signature as
    :func:`run_sweep`), clamped like :func:`gpu_seconds`."""
    try:
        n_layers = len(layers) if layers else len(find_card(card_id).layers)
    except NLAInputError:
        n_layers = 1
    return int(min(MAX_GPU_SECONDS, 15 + n_layers * _rollout_seconds(k, greedy, max_new_tokens)))


def _opened_with_length(card_id: str, max_new_tokens: int | None) -> tuple[OpenedCard, int]:
    """The opened card and the rollout length: the request's, else the card's capped at APP_MAX_NEW_TOKENS.

    Opened in the main process before the call; a reused ZeroGPU worker forked earlier may lack a
    card opened since, so it is opened here in that case."""
    oc = _OPEN.get(card_id) or get_open(card_id)
    return oc, (min(APP_MAX_NEW_TOKENS, oc.default_max_new_tokens) if max_new_tokens is None else max_new_tokens)


def _progress_fn(progress: Any) -> Callable[[float, str], None]:
    """The library's ``progress(frac, message)`` relayed to a ``gr.Progress`` (or nowhere)."""
    def step(frac: float, msg: str) -> None:
        if progress is not None:
            progress(frac, desc=msg)

    return step


@gpu(duration=gpu_seconds)
def run_verbalize(card_id: str, text: str, layer: int | None, k: int, tau: float | None, temperature: float,
                  seed: int | None, greedy: bool = False, max_new_tokens: int | None = None, strategy: str | None = None,
                  position: int | None = None, maps: bool = True, progress: Any = None) -> dict[str, Any]:
    """Verbalize on the card's device. Returns plain CPU data only: ``{"result": Verbalization.to_dict(),
    "heat": [(token, value), ...], "grid": token_layer_grid(...)}`` (``maps`` False: no heat map and
    grid, ``[]`` and None), or ``{"error": message}`` for a user error (so that on ZeroGPU the message
    survives the trip back from the worker process instead of becoming "ZeroGPU worker error")."""
    try:
        oc, max_new_tokens = _opened_with_length(card_id, max_new_tokens)
        res = oc.verbalize(text=text, layer=layer, k=k, tau=tau, temperature=temperature,
                           max_new_tokens=max_new_tokens, greedy=greedy, seed=seed, progress=_progress_fn(progress),
                           strategy=strategy, position=position)
        if not maps:
            return {"result": res.to_dict(), "heat": [], "grid": None}
        grid = token_layer_grid(oc, text, None, position)  # the heat map is its row at the layer read, if shown
        row = grid["layers"].index(res.layer) if res.layer in grid["layers"] else None
        heat = (list(zip(grid["tokens"], grid["values"][row])) if row is not None
                else token_heat(oc, text, res.layer, position))
        return {"result": res.to_dict(), "heat": heat, "grid": grid}
    except NLAInputError as exc:
        return {"error": str(exc)}


@gpu(duration=sweep_gpu_seconds)
def run_sweep(card_id: str, text: str, layers: list[int] | None, k: int, tau: float | None, temperature: float,
              seed: int | None, greedy: bool = False, max_new_tokens: int | None = None, strategy: str | None = None,
              progress: Any = None) -> dict[str, Any]:
    """The layer sweep (:func:`nla_space.sweep.sweep`) on the card's device, as :func:`run_verbalize`
    does one layer: ``{"sweep": [LayerResult.to_dict(), ...]}`` or ``{"error": message}``."""
    from ..sweep import sweep

    try:
        oc, max_new_tokens = _opened_with_length(card_id, max_new_tokens)
        results = sweep(oc, text, layers, k=k, tau=tau, temperature=temperature, max_new_tokens=max_new_tokens,
                        greedy=greedy, seed=seed, progress=_progress_fn(progress), strategy=strategy)
        return {"sweep": [r.to_dict() for r in results]}
    except NLAInputError as exc:
        return {"error": str(exc)}


class Verbalized(NamedTuple):
    """What :func:`verbalize` returns: the result (``Verbalization.to_dict()``) and the token maps."""

    result: dict[str, Any]
    heat: list[tuple[str, float]]  #: the heat map at the layer read (``[]`` without maps)
    grid: dict[str, Any] | None  #: :func:`~nla_space.ui.heat.token_layer_grid` (None without maps)


def verbalize(req: Request, progress: Callable[..., Any] | None = None, maps: bool = True) -> Verbalized:
    """Open the card in the main process (once), then run the GPU function; user errors raise NLAInputError.
    ``maps`` False skips the heat map and the grid (the API and the Compare tab show neither)."""
    get_open(req.card)
    out = run_verbalize(req.card, req.text, req.layer, req.k, req.tau, req.temperature, req.seed,
                        req.greedy, req.max_new_tokens, req.strategy, req.position, maps, progress=progress)
    if "error" in out:
        raise NLAInputError(out["error"])
    return Verbalized(out["result"], out["heat"], out["grid"])


def check_several_layers(card: str) -> None:
    """Refuse a card with a single layer (the app offers the sweep only for cards with several)."""
    layers = find_card(card).layers
    if len(layers) < 2:
        raise NLAInputError(f"card {card} has a single layer ({layers[0]}): the layer sweep needs a card with several layers; "
                            "use Verbalize instead")


def sweep(req: Request, progress: Callable[..., Any] | None = None) -> list[dict[str, Any]]:
    """Open the card in the main process (once), then sweep all its layers on the GPU function; user errors
    raise NLAInputError. ``req.layer`` is not used: every card layer is swept."""
    get_open(req.card)
    out = run_sweep(req.card, req.text, None, req.k, req.tau, req.temperature, req.seed, req.greedy,
                    req.max_new_tokens, req.strategy, progress=progress)
    if "error" in out:
        raise NLAInputError(out["error"])
    return out["sweep"]


# ------------------------------------------------------------------------------------------------
# Downloads

_DOWNLOADS = Path(tempfile.gettempdir()) / "nla-space-downloads"
_KEEP_FILES = 200


def write_json(result: dict[str, Any]) -> str:
    """Write a result to a fresh temp file (for ``gr.File``); old files beyond the last 200 are removed."""
    _DOWNLOADS.mkdir(parents=True, exist_ok=True)
    path = _DOWNLOADS / f"verbalization-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    tmp.replace(path)
    try:
        files = sorted(_DOWNLOADS.glob("verbalization-*.json"), key=lambda p: p.stat().st_mtime)
        for old in files[:-_KEEP_FILES]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
    return str(path)
