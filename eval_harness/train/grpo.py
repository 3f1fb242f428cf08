"""GRPO of a LoRA injection AV with a contrastive reward and a KL term, after nla-at-home's GRPO trainers
(``scripts/train_av_grpo.py``, ``scripts/train_universal_grpo_hard.py``, https://github.com/anicka-net/nla-at-home).

Per step (``batch`` activations from the ``rl`` split, each sampled ``group_size`` times):

Rollout
    The AV's own injected prompt (:class:`nla_space.verbalizers.injection.InjectionAV`, built from
    the SFT folder's sidecar exactly as the card loader does), :func:`nla_space.rollout.sample` at
    ``temperature`` / ``top_p``, stopped at the close tag's ids. A sample is *closed* when it wrote
    the close tag; its text is the card's parse (:meth:`InjectionAV.decode` of the cut ids).
Reward (:class:`ContrastiveReward`)
    ``r = cos_c(s(d), v) − cos_c(s(d), v')``: ``s`` is the scorer (``ar``: a trained ``lora_heads``
    AR, :func:`nla_space.reconstructors.open_reconstructor`; ``reencode``: the base model's own
    activation of the description, read like the training activations), ``v`` the true activation,
    ``v'`` the activation of another ``rl`` text at the same layer (drawn per activation), ``cos_c``
    the cosine after subtracting the target set's μ_ℓ (raw with ``--no-centered``). An unclosed or
    empty sample gets ``fail_reward`` (the "failed" rule of Anthropic's reward,
    https://github.com/kitft/natural_language_autoencoders, against length drift). The contrastive
    term is what keeps GRPO from collapsing into templates: nla-at-home reports that GRPO on the
    raw AR cosine alone reward-hacked into template descriptions.
Objective
    Group-normalised advantages ``A = (r − mean)/std`` (unbiased std; a group with std < 1e-6 is
    skipped). Per sample ``−A·Σ_t log π_t + kl_coef·Σ_t k3_t`` over its generated tokens (close tag
    included), ``k3 = exp(Δ) − Δ − 1``, ``Δ = log π_ref − log π``; summed over the step and divided
    by ``batch·group_size``; gradient clip; AdamW. The reference ``ref = sft`` is a frozen copy of the
    SFT adapter (its weights swapped in for the reference forward); ``ref = base`` is the adapter
    disabled (what nla-at-home's GRPO trainers with a KL term use).
Reward-hacking watch (``log.jsonl`` every step)
    ``reward``, ``cos_true`` / ``cos_wrong``, ``top1_vs_wrong`` (fraction of closed samples scored
    closer to v than to v'), ``closed_rate``, ``mean_len``, ``distinct_1`` / ``distinct_2`` (token
    n-grams of the step's samples), ``template_rate`` (samples whose first 8 tokens also open a sample
    of another activation), ``kl``. Every ``eval_every`` steps: greedy descriptions of held-out
    activations, ``eval_reward`` and ``eval_top1_vs_wrong`` (chance 0.5; an unclosed description is a miss). Below
    ``collapse_top1`` a warning is logged; with ``stop_on_collapse`` the run stops once the held-out
    top-1 falls below it after having been above it.
Output
    ``best/`` (highest ``eval_reward``): a loadable AV folder (PEFT files + ``nla_meta.yaml`` with
    ``stage: grpo``; nla-at-home's GRPO trainer writes none; ``best.json`` last); ``checkpoint/``
    (the LoRA checkpoint of :mod:`eval_harness.train.common`), ``log.jsonl``, ``train_config.json``,
    ``result.json``. Step ``s`` draws its groups (and each one's wrong text) from a generator seeded
    ``seed·1000003 + s``, and group ``b``'s rollouts from one seeded ``(seed·1000003 + s)·1009 + b``,
    so ``--resume`` continues exactly and an N-process run (groups split over the ranks,
    :mod:`eval_harness.distributed`) samples what one process samples; log rows, checkpoints and stops follow :mod:`eval_harness.train.loop`;
    claim, resume and kill safety :mod:`eval_harness.train.run_folder`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import yaml

from nla_space.backbone import Backbone
from nla_space.errors import NLAInputError
from nla_space.rollout import Rollout, sample
from nla_space.scoring import cosine
from nla_space.sidecar import SIDECAR_NAME
from nla_space.verbalizers.injection import InjectionAV, find_subsequence, load_inject_mu

from ..data.injection_targets import InjectionTargets, base_spec, extract_layers, trained_ar_section
from .. import distributed
from .run_folder import BEST_RECORD, RunFolder
from ..data.targets import distinct_ngrams
from .common import load_lora_checkpoint, load_lora_state, lora_state, make_av, write_av_folder, write_lora_checkpoint
from ..settings import resumable_settings, setting

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    """The trainer's settings (``train-grpo`` generates its options from these fields)."""

    steps: int = setting(200, resumable=True)
    batch: int = setting(4, "activations per step")
    group_size: int = setting(4, "samples per activation")
    temperature: float = setting(0.9)
    top_p: float = setting(1.0)
    max_new_tokens: int = setting(48)
    lr: float = setting(1e-5)
    weight_decay: float = setting(0.0, option=False)
    grad_clip: float = setting(1.0, option=False)
    kl_coef: float = setting(0.02)
    #: "sft" (frozen copy of the SFT adapter) or "base" (adapter disabled)
    ref: str = setting("sft", "KL reference: frozen SFT adapter, or adapter disabled", choices=("sft", "base"))
    scorer: str = setting("ar", choices=("ar", "reencode"))
    centered: bool = setting(True, "raw cosines in the reward (default: μ-centered)", negate="--no-centered")
    fail_reward: float = setting(-1.0, "reward of an unclosed or empty sample")
    eval_every: int = setting(25, resumable=True)
    eval_items: int = setting(32)
    collapse_top1: float = setting(0.55, "warn below this held-out contrastive top-1 (chance 0.5)")
    stop_on_collapse: bool = setting(False, "stop when held-out top-1 falls below --collapse-top1")
    seed: int = setting(0)


# ------------------------------------------------------------------------------------- scoring


class Scorer(Protocol):
    def encode(self, texts: list[str], layer: int) -> torch.Tensor: ...


class ReencodeScorer:
    """The base model's activation of each description (adapter disabled), read like the targets."""

    def __init__(self, backbone: Backbone, peft_model: Any):
        self.backbone, self.peft_model, self.spec = backbone, peft_model, base_spec()

    def encode(self, texts: list[str], layer: int) -> torch.Tensor:
        with self.peft_model.disable_adapter():
            return extract_layers(self.backbone, self.spec, texts, [layer])[layer]


def open_ar_scorer(folder: Path, backbone_spec: str, device: str | None = None) -> Any:
    """A ``lora_heads`` AR trained by ``train-ar`` (own copy of the base model), as a card loads it."""
    from nla_space.reconstructors import open_reconstructor

    return open_reconstructor(trained_ar_section(folder, backbone_spec), device=device, where="grpo scorer")


@dataclass
class ContrastiveReward:
    """``r = cos_c(s(d), v) − cos_c(s(d), v')`` (see the module docstring)."""

    scorer: Any
    mus: dict[int, torch.Tensor] | None
    fail_reward: float = -1.0

    def __call__(self, texts: list[str], ids: list[list[int]], closed: list[bool], v: torch.Tensor, v_wrong: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
        n = len(texts)
        ok = [i for i in range(n) if closed[i] and texts[i].strip()]
        reward = torch.full((n,), float(self.fail_reward))
        ct = torch.full((n,), float("nan"))
        cw = torch.full((n,), float("nan"))
        if ok:
            s = self.scorer.encode([texts[i] for i in ok], layer).float().cpu()
            mu = self.mus[layer] if self.mus else torch.zeros_like(v)
            t = cosine(s - mu, (v - mu)[None])
            w = cosine(s - mu, (v_wrong - mu)[None])
            idx = torch.tensor(ok)
            ct[idx], cw[idx], reward[idx] = t, w, t - w
        return {"reward": reward, "cos_true": ct, "cos_wrong": cw}


# ------------------------------------------------------------------------------------ policy


def rollout_group(av: InjectionAV, v: torch.Tensor, layer: int, n: int, cfg: GRPOConfig, gen: torch.Generator | None, greedy: bool = False
                  ) -> tuple[Rollout, list[list[int]], list[str], list[bool]]:
    """``n`` samples for one activation: the rollout (close tag included), the per-row token ids,
    parsed texts and whether each row closed."""
    prefix = av.inputs_embeds(v, layer).expand(n, -1, -1)
    stops = [list(av.close_ids)] if av.close_ids else None
    roll = sample(av.backbone, prefix, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, greedy=greedy,
                  generator=gen, stop_sequences=stops)
    roll = Rollout(ids=roll.ids.clone(), mask=roll.mask.clone())  # out of inference mode: the PG forward backpropagates
    cut = av.cut(roll)
    rows, texts, closed = [], [], []
    for i in range(n):
        full = [int(t) for t in roll.ids[i, : int(roll.mask[i].sum())]]
        rows.append(full)
        closed.append(bool(av.close_ids) and find_subsequence(full, list(av.close_ids)) >= 0)
        texts.append(av.decode([int(t) for t in cut.ids[i, : int(cut.mask[i].sum())]]))
    return roll, rows, texts, closed


def token_logprobs(av: InjectionAV, v: torch.Tensor, layer: int, roll: Rollout) -> torch.Tensor:
    """``(n, T)`` log π of each generated token after the injected prompt (masked rows: 0)."""
    bb = av.backbone
    dev = bb.device
    n, T = roll.ids.shape
    with torch.no_grad():
        prompt = av.inputs_embeds(v, layer).expand(n, -1, -1)
        gen = bb.embed_tokens(roll.ids.to(dev))
    P = prompt.shape[1]
    x = torch.cat([prompt, gen], dim=1)
    attn = torch.cat([torch.ones(n, P, dtype=torch.long, device=dev), roll.mask.to(dev)], dim=1)
    logits = bb.model(inputs_embeds=x, attention_mask=attn, use_cache=False, logits_to_keep=T + 1).logits[:, :T].float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, roll.ids.to(dev)[..., None])[..., 0]
    return lp * roll.mask.to(dev)


@contextlib.contextmanager
def swapped_lora(pm: Any, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """The adapter's weights temporarily replaced by ``tensors`` (the frozen SFT reference)."""
    current = lora_state(pm)
    with torch.no_grad():
        load_lora_state(pm, tensors)
    try:
        yield
    finally:
        with torch.no_grad():
            load_lora_state(pm, current)


def template_rate(rows: list[list[int]], owners: list[int], prefix: int = 8) -> float:
    """Fraction of samples whose first ``prefix`` tokens also open a sample of another activation."""
    firsts: dict[tuple[int, ...], set[int]] = {}
    for r, o in zip(rows, owners):
        firsts.setdefault(tuple(r[:prefix]), set()).add(o)
    return sum(1 for r in rows if len(firsts[tuple(r[:prefix])]) > 1) / max(len(rows), 1)


# ------------------------------------------------------------------------------------- train


def _nanmean(x: torch.Tensor) -> float | None:
    x = x[~torch.isnan(x)]
    return round(float(x.mean()), 5) if x.numel() else None


@torch.no_grad()
def evaluate(av: InjectionAV, reward: Any, ts: InjectionTargets, items: list[tuple[int, int]], wrong: list[int], cfg: GRPOConfig) -> dict[str, float]:
    """Greedy description of each held-out (text, layer); contrastive reward and top-1 against ``wrong``."""
    rs, hits, closed_n = [], [], 0
    for (i, ell), j in zip(items, wrong):
        v, vw = ts.vectors[ell][i], ts.vectors[ell][j]
        _, rows, texts, closed = rollout_group(av, v, ell, 1, cfg, None, greedy=True)
        out = reward(texts, rows, closed, v, vw, ell)
        rs.append(float(out["reward"][0]))
        closed_n += closed[0]
        hits.append(float(bool(out["cos_true"][0] > out["cos_wrong"][0])))  # unclosed (NaN) counts as a miss
    return {"eval_reward": sum(rs) / len(rs), "eval_top1_vs_wrong": sum(hits) / len(hits),
            "eval_closed_rate": closed_n / len(items), "eval_n": len(items)}


def train_grpo(backbone: Backbone, ts: InjectionTargets, sft_folder: Path, out: Path, cfg: GRPOConfig, ar_folder: Path | None = None,
               resume: bool = False, reward_fn: Any = None) -> dict[str, Any]:
    """GRPO from the SFT AV in ``sft_folder`` (attached to ``backbone``'s model in place: pass a private
    copy); ``reward_fn(texts, ids, closed, v, v_wrong, layer) -> {"reward": (n,)}`` replaces the
    contrastive reward (tests)."""
    from peft import PeftModel

    sft_folder = Path(sft_folder)
    if cfg.ref not in ("sft", "base") or cfg.scorer not in ("ar", "reencode"):
        raise NLAInputError("--ref must be 'sft' or 'base'; --scorer 'ar' or 'reencode'")
    if cfg.group_size < 2:
        raise NLAInputError("--group-size must be ≥ 2 (advantages are normalised within a group)")
    side_path = sft_folder / SIDECAR_NAME
    if not side_path.is_file():
        raise NLAInputError(f"{sft_folder}: no {SIDECAR_NAME}: not an AV folder written by train-av-lora")
    sidecar = yaml.safe_load(side_path.read_text(encoding="utf-8"))
    run = RunFolder(out, "train-grpo", resume=resume)
    pm = PeftModel.from_pretrained(backbone.model, str(sft_folder), is_trainable=True)
    pm.eval()  # no dropout in rollouts or the policy-gradient forward
    rule = (sidecar.get("training") or {}).get("injection_mode")
    inject_mu = load_inject_mu(sft_folder, ts.layers, backbone.hidden_size) if rule == "center_normalize" else None
    av = make_av(backbone, sidecar, pm, inject_mu)
    sft_state = lora_state(pm)
    if reward_fn is None:
        if cfg.scorer == "ar":
            if ar_folder is None:
                raise NLAInputError("--scorer ar needs --ar FOLDER (a train-ar best/ folder)")
            scorer: Any = open_ar_scorer(ar_folder, backbone.spec, device=str(backbone.device))
        else:
            scorer = ReencodeScorer(backbone, pm)
        reward_fn = ContrastiveReward(scorer, ts.mus if cfg.centered else None, cfg.fail_reward)
    rl = ts.examples("rl")
    rl_txt = ts.indices("rl")
    if len(rl_txt) < 2:
        raise NLAInputError(f"{ts.folder}: the rl split needs ≥ 2 texts (the wrong activation is another text)")
    held = ts.indices("heldout")
    eg = torch.Generator().manual_seed(cfg.seed + 17)
    items = [(held[j], ts.layers[int(torch.randint(len(ts.layers), (1,), generator=eg))]) for j in range(len(held))][: cfg.eval_items]
    wrong = [held[(held.index(i) + 1) % len(held)] for i, _ in items]
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = run.start({"targets": str(ts.folder), "sft": str(sft_folder), "ar": str(ar_folder) if ar_folder else None,
                       "backbone": backbone.spec, **asdict(cfg), "layers": ts.layers, "n_rl_rows": len(rl), "n_eval_items": len(items)},
                      lambda folder: load_lora_checkpoint(folder, pm, opt),
                      initial={"step": 0, "best": None, "best_step": None, "max_eval_top1": None, "elapsed_s": 0.0, "collapsed": False},
                      may_change=resumable_settings(GRPOConfig))

    def assess(step: int) -> dict[str, Any]:
        """The held-out evaluation, the collapse watch and its record in the state."""
        if not items:
            return {}
        res: dict[str, Any] = evaluate(av, reward_fn, ts, items, wrong, cfg)
        top1 = res["eval_top1_vs_wrong"]
        if top1 < cfg.collapse_top1:
            log.warning("step %d: held-out contrastive top-1 %.3f < %.2f (chance 0.5): the AV is losing the activation "
                        "(reward hacking / template collapse?)", step, top1, cfg.collapse_top1)
            res["warning"] = "eval_top1_near_chance"
            if cfg.stop_on_collapse and step > 0 and (state["max_eval_top1"] or 0.0) >= cfg.collapse_top1:
                state["collapsed"] = True
        state["max_eval_top1"] = max(top1, state["max_eval_top1"] or 0.0)
        return res

    def write_best(folder: Path, step: int, res: dict[str, Any]) -> None:
        sc = json.loads(json.dumps(sidecar))
        sc["stage"] = "grpo"
        sc["training"] = {**sc.get("training", {}), "stage": "grpo", "grpo": {**asdict(cfg), "step": step, "sft": str(sft_folder),
                                                                             "eval_reward": round(res["eval_reward"], 5)}}
        write_av_folder(folder, pm, sc, {BEST_RECORD: {"step": step, **res}}, inject_mu=av.inject_mu)

    n_rows = cfg.batch * cfg.group_size

    def group(step: int, b: int, i: int, ell: int, j: int) -> dict[str, Any]:
        """Group ``b`` of step ``step``: its rollouts (from a generator seeded by the step and ``b``,
        so a group's samples do not depend on which rank draws them), reward, and the backward of
        its share of the loss. Returns the group's statistics."""
        gen = torch.Generator(device=backbone.device).manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + b)
        v, vw = ts.vectors[ell][i], ts.vectors[ell][j]
        with torch.no_grad():
            roll, rows, texts, closed = rollout_group(av, v, ell, cfg.group_size, cfg, gen)
        r = reward_fn(texts, rows, closed, v, vw, ell)
        rew = r["reward"].float()
        out: dict[str, Any] = {"b": b, "reward": rew, "cos_true": r.get("cos_true", torch.full_like(rew, float("nan"))),
                               "cos_wrong": r.get("cos_wrong", torch.full_like(rew, float("nan"))), "closed": closed, "rows": rows,
                               "loss": None, "kl": None}
        std = rew.std()
        if not bool(std > 1e-6):
            return out
        adv = ((rew - rew.mean()) / std).to(backbone.device)
        with torch.no_grad():
            if cfg.ref == "sft":
                with swapped_lora(pm, sft_state):
                    ref_lp = token_logprobs(av, v, ell, roll)
            else:
                with pm.disable_adapter():
                    ref_lp = token_logprobs(av, v, ell, roll)
        lp = token_logprobs(av, v, ell, roll)
        m = roll.mask.to(lp.device).float()
        delta = (ref_lp - lp) * m
        k3 = (torch.exp(delta) - delta - 1.0) * m
        loss = (-(adv[:, None] * lp * m).sum(1) + cfg.kl_coef * k3.sum(1)).sum() / n_rows
        loss.backward()
        out["loss"], out["kl"] = float(loss.detach()), float(k3.detach().sum() / m.sum().clamp_min(1))
        return out

    def grpo_step(step: int) -> dict[str, Any]:
        """One GRPO update: ``batch`` groups drawn by the generator seeded by ``step``, split over the
        ranks (:mod:`eval_harness.distributed`; gradients summed), then the statistics of all groups
        in group order; returns the reward-hacking watch fields."""
        cpu_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        pick = torch.randint(len(rl), (cfg.batch,), generator=cpu_gen).tolist()
        plan = []
        for b, k in enumerate(pick):
            i, ell = rl[k]
            others = [t for t in rl_txt if t != i]
            plan.append((b, i, ell, others[int(torch.randint(len(others), (1,), generator=cpu_gen))]))
        opt.zero_grad(set_to_none=True)
        groups = distributed.gather_in_order([group(step, *g) for g in distributed.shard(plan)], len(plan))
        distributed.all_reduce_grads(params)
        skipped = sum(g["loss"] is None for g in groups)
        if skipped < len(pick):
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        rew_all = torch.cat([g["reward"] for g in groups])
        ct, cw = torch.cat([g["cos_true"] for g in groups]), torch.cat([g["cos_wrong"] for g in groups])
        valid = ~torch.isnan(ct)
        closed_all = [c for g in groups for c in g["closed"]]
        all_rows = [r for g in groups for r in g["rows"]]
        owners = [g["b"] for g in groups for _ in g["rows"]]
        kls = [g["kl"] for g in groups if g["kl"] is not None]
        return {
            "loss": round(sum(g["loss"] for g in groups if g["loss"] is not None), 6), "reward": round(float(rew_all.mean()), 5),
            "cos_true": _nanmean(ct), "cos_wrong": _nanmean(cw),
            "top1_vs_wrong": round(float((ct[valid] > cw[valid]).float().mean()), 4) if bool(valid.any()) else None,
            "closed_rate": round(sum(closed_all) / len(closed_all), 4),
            "mean_len": round(sum(len(x) for x in all_rows) / len(all_rows), 2),
            "distinct_1": round(distinct_ngrams(all_rows, 1), 4), "distinct_2": round(distinct_ngrams(all_rows, 2), 4),
            "template_rate": round(template_rate(all_rows, owners), 4),
            "kl": round(sum(kls) / len(kls), 6) if kls else None,
            "skipped_groups": skipped,
        }

    state = run.loop(total=cfg.steps, eval_every=cfg.eval_every, desc="train-grpo", step=grpo_step,
                     validate=run.validation(assess, "eval_reward", higher_is_better=True, write_best=write_best, time_key="eval_s"),
                     write_checkpoint=lambda folder: write_lora_checkpoint(folder, pm, opt, state),
                     postfix=lambda row: {"reward": f"{row['reward']:.3f}", "top1": row["top1_vs_wrong"], "kl": row["kl"]},
                     should_stop=lambda: state["collapsed"])
    if state["collapsed"]:
        log.error("stopped at step %d: held-out contrastive top-1 fell below %.2f; best/ holds step %s", state["step"], cfg.collapse_top1, state["best_step"])
    return state
