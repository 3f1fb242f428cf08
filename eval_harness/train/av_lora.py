"""LoRA SFT of a token-injection AV on an injection target set: the recipe of nla-at-home's
``scripts/train_universal_av.py`` (https://github.com/anicka-net/nla-at-home).

The recipe is the inference recipe of :mod:`nla_space.verbalizers.injection`, run through the same
code: the sidecar this trainer writes is merged with the template card's ``injection`` section by
:func:`~nla_space.verbalizers.injection.resolve_spec`, and :class:`InjectionAV` builds each prompt
(depth % from the block, chat-wrapped, marker neighbour-checked) and replaces the marker row with
the activation normalized to ``injection_scale``. So the saved folder opens through the normal card
loader with the prompts it was trained on.

Example
    ``(v = activation of text i at layer ℓ, description_i)``: inputs = the injected prompt
    embeddings followed by the embeddings of ``ids(description) + ids(close tag)`` (tokenized
    separately, so the close tag's ids are exactly the sampler's stop sequence and the AV learns to
    stop, unlike nla-at-home's AVs); labels = those target ids, the prompt masked; the loss is the
    mean token cross-entropy over target tokens (float32 logits).
Data
    The ``av_sft`` split: every text at every layer of the set. A seeded ``val_frac`` of its
    *texts* is validation (``val_text_ids.json`` in the saved folder, as nla-at-home does).
Validation
    ``val_loss`` (real vectors) and ``val_loss_shuffled`` (each val vector replaced by another val
    text's vector at the same layer); ``val_gap = shuffled − real`` is the real-vs-shuffled loss gap
    that Anthropic's training notes track as the sign that the AV reads the vector, rather than the
    training loss (https://github.com/kitft/natural_language_autoencoders). ``best/`` keeps the
    lowest ``val_loss``.
Output folder (:mod:`eval_harness.train.run_folder`: claim, resume, kill safety)
    ``best/`` (PEFT ``adapter_config.json`` + ``adapter_model.safetensors``, ``nla_meta.yaml``,
    ``val_text_ids.json``, ``best.json`` last), ``checkpoint/`` (the LoRA checkpoint of
    :mod:`eval_harness.train.common`), ``log.jsonl``, ``train_config.json``, ``result.json``. Batch
    order, log rows, checkpoints, SIGTERM/SIGINT and ``--resume`` follow :mod:`eval_harness.train.loop`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nla_space.backbone import Backbone
from nla_space.cards import Card
from nla_space.cards.sections import AVSection, BackboneSection
from nla_space.errors import CheckpointError, NLAInputError
from nla_space.sidecar import Sidecar
from nla_space.verbalizers.injection import INJECT_MU_FILE, INJECTION_RULES, InjectionAV, encode, prompt_ids, resolve_spec

from ..data.injection_targets import InjectionTargets, template_card, template_section, trained_ar_section
from .loop import SupervisedStep, epoch_schedule
from .run_folder import BEST_RECORD, RunFolder
from .common import add_lora, load_lora_checkpoint, make_av, write_av_folder, write_lora_checkpoint
from ..settings import resumable_settings, setting

log = logging.getLogger(__name__)

#: tried in order when the preferred marker is not one token of the tokenizer (Anthropic scans U+3200–U+33FF)
MARKER_CANDIDATES = ["★", "㈎", "㈜", "㎡"] + [chr(c) for c in range(0x3200, 0x3400)]


@dataclass
class AVTrainConfig:
    """The trainer's settings (``train-av-lora`` generates its options from these fields)."""

    epochs: float = setting(3.0, resumable=True)
    lr: float = setting(1e-4)
    batch_size: int = setting(8)
    max_steps: int | None = setting(None, "overrides --epochs", resumable=True)
    warmup_steps: int = setting(0)
    grad_clip: float = setting(1.0, option=False)
    lora_r: int = setting(16)
    lora_alpha: int = setting(64)
    lora_dropout: float = setting(0.05)
    target_modules: str = setting("all-linear", "comma list of module names, or all-linear")
    rule: str = setting("normalize", "center_normalize: inject (v − μ_ℓ) at the scale (for backbones whose activations share one "
                        "direction)", choices=INJECTION_RULES)
    #: default: the target set's suggested scale (largest median norm)
    injection_scale: float | None = setting(None, "default: the target set's suggested scale")
    marker: str = setting("★", "preferred marker (another single-token char is used if it is not one token)")
    max_target_len: int = setting(64)
    val_frac: float = setting(0.1)
    val_every: int = setting(50, resumable=True)
    val_rows: int = setting(64)
    seed: int = setting(0)


# ------------------------------------------------------------------------------ spec and sidecar


def choose_marker(tokenizer: Any, preferred: str = "★") -> str:
    """The preferred marker if it is one ordinary token of ``tokenizer`` and stays one token inside
    the template, else the first candidate that does (``MARKER_CANDIDATES``)."""
    section = template_section()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    for m in [preferred] + [c for c in MARKER_CANDIDATES if c != preferred] + vocab_symbols(tokenizer):
        ids = encode(tokenizer, m, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == unk or ids[0] in special:
            continue
        text = str(section.template).format(injection_char=m, depth_pct=50)
        if encode(tokenizer, text, add_special_tokens=False).count(ids[0]) == 1:
            return m
    raise NLAInputError("no single-token marker found for this tokenizer (tried ★, U+3200–U+33FF and single-symbol vocabulary entries)")


def vocab_symbols(tokenizer: Any) -> list[str]:
    """Single non-ASCII, non-alphanumeric characters that are one vocabulary entry, rarest (highest
    id) first: the fallback when no usual marker is one token (e.g. SmolLM2's byte-level BPE)."""
    out = []
    for i in range(len(tokenizer) - 1, -1, -1):
        t = tokenizer.decode([i])
        if len(t) == 1 and ord(t) > 127 and not t.isalnum() and not t.isspace() and t != "\ufffd":
            out.append(t)
    return out


def make_sidecar(backbone: Backbone, marker: str, rule: str, scale: float, depth_pcts: list[int], training: dict[str, Any]) -> dict[str, Any]:
    """The ``nla_meta.yaml`` of an AV trained here (schema of :mod:`nla_space.sidecar`). Neighbour
    ids are read off the rendered prompt, so the loader's marker check is exact."""
    section = template_section()
    tok = backbone.tokenizer
    mid = encode(tok, marker, add_special_tokens=False)
    spec = resolve_spec(section, Sidecar.from_dict({"tokens": {"injection_char": marker}}), "sidecar")
    ids = prompt_ids(tok, spec, depth_pcts[0] if depth_pcts else None)
    hits = [p for p, t in enumerate(ids) if t == mid[0]]
    if len(mid) != 1 or len(hits) != 1 or not 0 < hits[0] < len(ids) - 1:
        raise CheckpointError(f"marker {marker!r} is not one token inside the prompt (ids {mid}, {len(hits)} occurrence(s))")
    p = hits[0]
    return {
        "kind": "nla_model", "schema_version": 2, "role": "av", "variant": "universal", "stage": training.get("stage", "sft"),
        "d_model": backbone.hidden_size, "n_layers": backbone.num_layers,
        "extraction": {"injection_scale": float(scale), **({"inject_mu_file": INJECT_MU_FILE} if rule == "center_normalize" else {})},
        "tokens": {"injection_char": marker, "injection_token_id": int(mid[0]),
                   "injection_left_neighbor_id": int(ids[p - 1]), "injection_right_neighbor_id": int(ids[p + 1])},
        "prompt_templates": {"av": section.template, "ar": trained_ar_section().template},
        "depth_percentages": sorted(set(int(x) for x in depth_pcts)),
        "training": {"injection_mode": rule, "chat_template": True, "template_card": template_card().id, **training},
    }


def injection_card(av_folder: Path, ar_folder: Path, backbone: str, layers: list[int], card_id: str = "local/injection-av",
                   mu_file: str | None = None, default_tau: float = 0.7) -> Card:
    """An injection :class:`Card` for an AV folder trained here and a ``lora_heads`` AR folder
    (``mu_file`` e.g. ``"mu_L{layer}.safetensors"`` gives centered scores). Its JSON (``.to_json``
    of :func:`injection_card_dict`) opens with ``open_card("card.json")``."""
    return Card.from_dict(injection_card_dict(av_folder, ar_folder, backbone, layers, card_id, mu_file, default_tau), "trained")


def injection_card_dict(av_folder: Path, ar_folder: Path, backbone: str, layers: list[int], card_id: str = "local/injection-av",
                        mu_file: str | None = None, default_tau: float = 0.7) -> dict[str, Any]:
    """The card file of an AV and AR trained here: the template card's injection recipe (the sidecar states the
    marker id; the template card's trained bands are not this AV's) and :func:`trained_ar_section`."""
    section = template_section()
    section = dataclasses.replace(section, marker_id=None, depth=dataclasses.replace(section.depth, trained_bands=[]))
    card = Card(id=card_id, kind="injection", title=f"injection AV trained on {backbone}",
                description="LoRA injection AV and LoRA+heads AR trained by eval_harness (docs/training_injection.md)",
                license="see the backbone's license", backbone=BackboneSection(id=backbone, revision=None, dtype="float32"),
                layers=list(layers), av=AVSection(folder=str(Path(av_folder).resolve()), format="peft_lora"),
                default_tau=default_tau, injection=section, reconstructor=trained_ar_section(ar_folder, backbone, mu_file))
    return card.to_dict()


# ------------------------------------------------------------------------------------------ loss


def target_ids(av: InjectionAV, description: str, max_len: int) -> list[int]:
    """``ids(description)[:max_len] + ids(close tag)`` (tokenized separately; no special tokens)."""
    body = encode(av.backbone.tokenizer, description.strip(), add_special_tokens=False)[:max_len] if description.strip() else []
    return body + list(av.close_ids)


def sft_loss(av: InjectionAV, vectors: torch.Tensor, layers: list[int], targets: list[list[int]]) -> torch.Tensor:
    """Mean token CE of each row's target ids after its injected prompt (prompt positions unlabelled)."""
    bb = av.backbone
    dev = bb.device
    rows = []
    for v, ell, tgt in zip(vectors, layers, targets):
        with torch.no_grad():
            prompt = av.inputs_embeds(v, ell)[0]
            tail = bb.embed_tokens(torch.tensor(tgt, device=dev))
        rows.append((torch.cat([prompt, tail], dim=0), prompt.shape[0], tgt))
    T = max(r[0].shape[0] for r in rows)
    d = rows[0][0].shape[1]
    x = torch.zeros(len(rows), T, d, dtype=rows[0][0].dtype, device=dev)
    mask = torch.zeros(len(rows), T, dtype=torch.long, device=dev)
    labels = torch.full((len(rows), T), -100, dtype=torch.long, device=dev)
    for i, (e, p, tgt) in enumerate(rows):
        x[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
        labels[i, p : p + len(tgt)] = torch.tensor(tgt, device=dev)
    p0 = min(r[1] for r in rows)  # the LM head runs only from the shortest prompt's last position on
    logits = bb.model(inputs_embeds=x, attention_mask=mask, use_cache=False, logits_to_keep=T - p0 + 1).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, p0:].reshape(-1), ignore_index=-100)


@torch.no_grad()
def val_losses(av: InjectionAV, ts: InjectionTargets, rows: list[tuple[int, int]], targets: dict[int, list[int]], batch: int) -> dict[str, float]:
    """``val_loss`` with the true vectors and ``val_loss_shuffled`` with another val text's vector
    at the same layer (a fixed derangement), token-weighted over ``rows``."""
    texts = sorted({i for i, _ in rows})
    shift = {t: texts[(k + 1) % len(texts)] for k, t in enumerate(texts)}
    out = {}
    for name, pick in (("val_loss", lambda i: i), ("val_loss_shuffled", lambda i: shift[i])):
        tot, n = 0.0, 0
        for j in range(0, len(rows), batch):
            chunk = rows[j : j + batch]
            v = torch.stack([ts.vectors[ell][pick(i)] for i, ell in chunk])
            loss = sft_loss(av, v, [ell for _, ell in chunk], [targets[i] for i, _ in chunk])
            k = sum(len(targets[i]) for i, _ in chunk)
            tot += float(loss) * k
            n += k
        out[name] = tot / max(n, 1)
    out["val_gap"] = out["val_loss_shuffled"] - out["val_loss"]
    return out


# ----------------------------------------------------------------------------------------- train


def split_val(ts: InjectionTargets, frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(train texts, val texts) of ``av_sft``, by text, seeded."""
    idx = ts.indices("av_sft")
    if len(idx) < 2:
        raise NLAInputError(f"{ts.folder}: the av_sft split has {len(idx)} text(s); need at least 2")
    order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(2 if len(idx) >= 4 else 1, int(round(frac * len(idx))))  # ≥ 2 so the shuffled-vector check has another text
    val = sorted(idx[j] for j in order[:n_val])
    return sorted(idx[j] for j in order[n_val:]), val


def train_av(backbone: Backbone, ts: InjectionTargets, out: Path, cfg: AVTrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the AV; returns the final state. The LoRA is attached to ``backbone``'s model in
    place: pass a private copy (``load_backbone``), not a shared one."""
    if ts.meta.get("d_model") != backbone.hidden_size or ts.meta.get("n_blocks") != backbone.num_layers:
        raise NLAInputError(f"the target set was built on d={ts.meta.get('d_model')}, {ts.meta.get('n_blocks')} blocks; "
                            f"this backbone has d={backbone.hidden_size}, {backbone.num_layers} blocks")
    run = RunFolder(out, "train-av-lora", resume=resume)
    train_txt, val_txt = split_val(ts, cfg.val_frac, cfg.seed)
    scale = float(cfg.injection_scale or ts.meta["suggested_injection_scale"])
    marker = choose_marker(backbone.tokenizer, cfg.marker)
    if marker != cfg.marker:
        log.warning("marker %r is not a single token here; using %r", cfg.marker, marker)
    pcts = [d.prompt_pct for d in ts.depths()]
    training = {"method": "lora_sft", "stage": "sft", "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                "lr": cfg.lr, "epochs": cfg.epochs, "n_train": len(train_txt) * len(ts.layers), "n_val": len(val_txt) * len(ts.layers),
                "corpus": str(ts.folder), "layers": ts.layers}
    sidecar = make_sidecar(backbone, marker, cfg.rule, scale, pcts, training)
    pm = add_lora(backbone, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.seed)
    av = make_av(backbone, sidecar, pm, dict(ts.mus) if cfg.rule == "center_normalize" else None)
    for ell in ts.layers:
        av.prompt(ell)  # the loader's marker check, before any training
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    train_rows = [(i, ell) for i in train_txt for ell in ts.layers]
    val_rows = [(i, ell) for i in val_txt for ell in ts.layers][: cfg.val_rows]
    targets = {i: target_ids(av, ts.descriptions[i], cfg.max_target_len) for i in train_txt + val_txt}
    spe, total = epoch_schedule(len(train_rows), cfg.batch_size, cfg.epochs, cfg.max_steps)
    state = run.start({"targets": str(ts.folder), "backbone": backbone.spec, **asdict(cfg), "injection_scale": scale, "marker": marker,
                       "layers": ts.layers, "prompt_pcts": pcts, "steps_per_epoch": spe, "total_steps": total,
                       "n_train_rows": len(train_rows), "n_val_rows": len(val_rows)},
                      lambda folder: load_lora_checkpoint(folder, pm, opt), may_change=resumable_settings(AVTrainConfig) | {"total_steps"})

    def evaluate(step: int) -> dict[str, Any]:
        pm.eval()
        res: dict[str, Any] = val_losses(av, ts, val_rows, targets, cfg.batch_size)
        pm.train()
        return res

    def write_best(folder: Path, step: int, res: dict[str, Any]) -> None:
        sc = dict(sidecar)
        sc["training"] = {**sidecar["training"], "best_val_loss": round(res["val_loss"], 5), "best_step": step}
        write_av_folder(folder, pm, sc, {"val_text_ids.json": [ts.ids[i] for i in val_txt],
                                         BEST_RECORD: {"step": step, **res, "targets": str(ts.folder)}}, inject_mu=av.inject_mu)

    def loss_fn(batch: list[tuple[int, int]], step: int) -> torch.Tensor:
        v = torch.stack([ts.vectors[ell][i] for i, ell in batch])
        return sft_loss(av, v, [ell for _, ell in batch], [targets[i] for i, _ in batch])

    def lr_at(step: int) -> float:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr

    pm.train()
    sgd = SupervisedStep(train_rows, cfg.batch_size, cfg.seed, opt, params, cfg.grad_clip, loss_fn, lr_at,
                         units=lambda batch: sum(len(targets[i]) for i, _ in batch))  # the loss is a mean over target tokens
    return run.loop(total=total, eval_every=cfg.val_every, desc="train-av-lora", step=sgd,
                    validate=run.validation(evaluate, "val_loss", higher_is_better=False, write_best=write_best),
                    write_checkpoint=lambda folder: write_lora_checkpoint(folder, pm, opt, state),
                    postfix=sgd.postfix(state), first_row={"epoch": 0.0, "loss": None, "lr": 0.0})
