"""``publish``: turn a trained run into a Hub-ready release folder (and optionally push it).

Input ``--run DIR``: a card-like folder — ``config.json`` (NLAConfig) + ``av.safetensors`` or a
reference ``best_av.pt`` — optionally with ``mu.safetensors``, ``card.json`` and results JSONs
(``DIR/eval/*.json`` or ``DIR/*.json`` with a ``meta.command``), or a ``train`` run folder whose
``best/`` subfolder is such a folder (its ``best.json`` and ``train_config.json`` go into the model
card's Training section). More results: ``--results``.
μ, when the run has none: ``--mu FILE`` or ``--targets DIR`` (its ``mu.safetensors``).

Output ``--out DIR`` (the layout ``nla_space`` loads as a card, ``ARCHITECTURE.md``):

``config.json``       NLAConfig, every field
``av.safetensors``    adapter tensors only (a ``best_av.pt`` is converted, never unpickled unsafely)
``mu.safetensors``    ``{"mu": (d,)}`` — the centering mean the scores used
``card.json``         card fields (title, backbone, layers, μ file, τ, anchors when reproduced)
``eval/*.json``       the results files, unchanged (reference keys + ``meta``)
``README.md``         model card: Hub YAML front matter (license, base_model, library_name, tags,
                      model-index with the eval results), how to load it with this project, the
                      numbers with their settings

``--push REPO_ID`` uploads the folder with ``huggingface_hub``, whose own token resolution applies
(``HF_TOKEN``, else the saved ``hf auth login``); offline mode or a missing token is a clear error.
The front matter is written by ``huggingface_hub.ModelCardData`` with ``EvalResult`` rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from nla_space.backbone import EMBEDDED_BACKBONES
from nla_space.cards import Card
from nla_space.errors import CheckpointError, NLAInputError
from nla_space.hub import load_state_dict
from nla_space.io import atomic_write_json, atomic_write_text, save_tensors
from nla_space.verbalizers.config import NLAConfig
from nla_space.verbalizers.prefix import find_weights

from .results import load_results

log = logging.getLogger(__name__)

HELP = "make a Hub-ready release folder (config, weights, μ, evals, model card) from a run; optionally push it"
LICENSE = "apache-2.0"
TAGS = ["nla-space", "activation-verbalizer", "interpretability", "srt-nla", "prefix-tuning"]

#: (results command, key, model-index metric name) — the numbers put into the model-index
INDEX_METRICS = (
    ("centered-eval", "adapter_cen_bestofK_mean", "best-of-{K} centered fve_nrm"),
    ("centered-eval", "adapter_cen_greedy_mean", "greedy centered fve_nrm"),
    ("centered-eval", "adapter_cen_sampled_mean", "sampled-mean centered fve_nrm"),
    ("centered-eval", "nn_cen_mean", "NN-retrieval centered fve_nrm (baseline)"),
    ("centered-eval", "random_cen_mean", "random floor centered fve_nrm"),
    ("centered-eval", "adapter_raw_bestofK_mean", "best-of-{K} raw fve_nrm"),
    ("centered-eval", "adapter_raw_greedy_mean", "greedy raw fve_nrm"),
    ("rerank-eval", "logp_rerank_cen_mean", "logp-rerank of {K} centered fve_nrm"),
    ("rerank-eval", "nn_anchor_rerank_cen_mean", "NN-anchor rerank of {K} centered fve_nrm"),
    ("rerank-eval", "spearman_logp_vs_oracle_cen_mean", "Spearman(logp, oracle centered)"),
    ("oracle-ceiling", "replay_cen_fve_mean", "replay centered fve_nrm"),
    ("oracle-ceiling", "paraphrase_best_cen_fve_mean", "paraphrase best-of-{K} centered fve_nrm (ceiling)"),
    ("oracle-ceiling", "nn_in_pool_cen_fve_mean", "NN-in-pool centered fve_nrm"),
    ("oracle-ceiling", "random_floor_cen_fve_mean", "random floor centered fve_nrm (oracle-ceiling)"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, help="trained run folder (config.json + av.safetensors/best_av.pt)")
    p.add_argument("--out", required=True, type=Path, help="release folder to write")
    p.add_argument("--results", type=Path, nargs="*", default=[], help="more results JSONs or folders for eval/")
    p.add_argument("--mu", type=Path, default=None, help="μ file when the run has none")
    p.add_argument("--targets", type=Path, default=None, help="targets folder whose mu.safetensors is μ (when the run has none)")
    p.add_argument("--name", default=None, help="model name in the card (default: --push repo id or the run folder name)")
    p.add_argument("--push", default=None, metavar="REPO_ID", help="upload the folder to this Hub model repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")


def hub_base_model(spec: str) -> str | None:
    """The Hub id of a backbone spec (``embedded:NAME`` → its hub equivalent); None for local folders."""
    if spec.startswith("embedded:"):
        return EMBEDDED_BACKBONES.get(spec.split(":", 1)[1], {}).get("hub_equivalent")
    if "/" in spec and not spec.startswith((".", "/", "~")) and not Path(spec).exists():
        return spec
    return None


def _mu(run: Path, args: argparse.Namespace) -> torch.Tensor | None:
    for path in ([run / "mu.safetensors"] + sorted(run.glob("mu_l*.pt")) + sorted(run.glob("mu_l*.safetensors"))
                 + ([args.mu] if args.mu else []) + ([args.targets / "mu.safetensors"] if args.targets else [])):
        if path.is_file():
            t = load_state_dict(path)
            mu = t.get("mu", next(iter(t.values())) if len(t) == 1 else None)
            if mu is None:
                raise CheckpointError(f"{path}: no 'mu' tensor")
            return mu.float().reshape(-1)
    return None


def eval_results(results: list[dict[str, Any]]) -> list[Any]:
    """The numbers of :data:`INDEX_METRICS` found in ``results``, as ``huggingface_hub`` ``EvalResult`` rows
    (the model-index the Hub renders), one per metric, with the run's M, K, pool size and seed as dataset args."""
    from huggingface_hub import EvalResult

    rows = []
    for res in results:
        meta = res["meta"]
        targets = Path(str(meta.get("targets") or "targets")).name
        for cmd, key, label in INDEX_METRICS:
            val = res.get(key)
            if meta.get("command") != cmd or not isinstance(val, (int, float)) or isinstance(val, bool):
                continue
            rows.append(EvalResult(
                task_type="activation-verbalization", task_name=f"Activation verbalization ({cmd})",
                dataset_type="nla-space/targets", dataset_name=f"{targets} (test split, M={meta.get('M')})",
                dataset_split="test",
                dataset_args={"M": meta.get("M"), "K": meta.get("K"), "pool_size": meta.get("pool_size"), "seed": meta.get("seed")},
                metric_type=key, metric_name=label.format(K=meta.get("K")), metric_value=round(float(val), 4)))
    return rows


def card_data(name: str, base: str | None, results: list[dict[str, Any]]) -> Any:
    """The model card's metadata (``huggingface_hub.ModelCardData``): licence, library, tags, base model, model-index."""
    from huggingface_hub import ModelCardData

    rows = eval_results(results)
    return ModelCardData(license=LICENSE, library_name="nla-space", tags=TAGS, base_model=base,
                         model_name=name if rows else None, eval_results=rows or None)


def _table(res: dict[str, Any]) -> str:
    rows = [(k, v) for k, v in res.items() if k != "meta" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines = ["| key | value |", "|---|---|"] + [f"| `{k}` | {v:.4f} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in rows]
    for k, v in res.items():
        if isinstance(v, dict) and k != "meta":
            lines.append(f"| `{k}` | " + ", ".join(f"{kk}: {vv:.3f}" if isinstance(vv, float) else f"{kk}: {vv}" for kk, vv in v.items()) + " |")
    return "\n".join(lines)


def model_card(name: str, cfg: NLAConfig, card: dict[str, Any], results: list[dict[str, Any]], eval_files: list[str],
               repo_id: str | None, training: str = "") -> str:
    base = hub_base_model(cfg.backbone_id)
    where = repo_id or "path/to/this/folder"
    load = (f'from huggingface_hub import snapshot_download\nfolder = snapshot_download("{repo_id}")\n' if repo_id
            else f'folder = "{where}"\n')
    parts = [
        "---\n" + card_data(name, base, results).to_yaml() + "\n---\n",
        f"# {name}\n",
        f"{card.get('description') or 'An SRT-style prefix activation verbalizer (AV) trained with nla-space.'}\n",
        "Given the hidden state v of a frozen backbone at one layer (the last token of a text), the AV writes a "
        "text whose own re-encoded hidden state h is close to v. Scores are fve_nrm = ½(1 + cos(h, v)); "
        "*centered* subtracts the pool mean μ (`mu.safetensors`) from both first.\n",
        "## Card\n",
        "| | |\n|---|---|\n"
        f"| backbone (frozen) | `{cfg.backbone_id}`{f' (Hub: `{base}`)' if base and base != cfg.backbone_id else ''} |\n"
        f"| layer | `hidden_states[{cfg.extraction_layer}]` (0 = embeddings), read at the last token of `[BOS] + text` |\n"
        f"| adapter | {cfg.num_inject_slots} inject slot(s) + {cfg.num_prefix_tokens} static prefix token(s), `inject_norm={cfg.inject_norm}` |\n"
        "| round trip | generated ids re-encoded prefix-free, no BOS, read at the first EOS if any, else the last token |\n",
        "## How to load it with nla-space\n",
        "```bash\n"
        f"python -m nla_space verbalize --card {where} --text \"The Eiffel Tower is in Paris.\" --k 16 --json\n"
        "```\n",
        "```python\n" + load + "from nla_space.runtime import open_card\n\n"
        "oc = open_card(folder)  # reads config.json, av.safetensors, mu.safetensors, card.json\n"
        'out = oc.verbalize(text="The Eiffel Tower is in Paris.", k=16)\n'
        "print(out.best.text, out.score, out.hedged)\n```\n",
        "## Files\n",
        "| file | contents |\n|---|---|\n| `config.json` | NLAConfig (SRT-compatible) |\n"
        "| `av.safetensors` | adapter tensors only (`proj.weight`, `prefix_embeds`, …) |\n"
        "| `mu.safetensors` | `mu`: the centering mean (mean of the targets' `mu_pool` split) |\n"
        "| `card.json` | nla-space card fields |\n" + "".join(f"| `{f}` | results JSON (reference keys + `meta`) |\n" for f in eval_files),
        *([f"## Training\n\nToken cross-entropy of the gold text under teacher forcing (`python -m eval_harness train`), "
            f"on the targets' `train` split; selection on the `val` split.\n\n{training}\n"] if training else []),
        "## Evaluation\n",
        "All numbers are measured by `python -m eval_harness` on the **held-out test split** of the targets "
        "(disjoint from training by construction); μ and the NN pool come from the separate `mu_pool` split. "
        "Each file's `meta` records card, backbone revision, layer, M, K, pool size, seed, git commit, "
        "package versions, device and wall time.\n",
    ]
    if not results:
        parts.append("\nNo eval results were published with this checkpoint.\n")
    for res, fname in zip(results, eval_files):
        m = res["meta"]
        parts.append(f"\n### `{fname}` — {m.get('command')} (M={m.get('M')}, K={m.get('K')}, pool {m.get('pool_size')}, "
                     f"seed {m.get('seed')}, T={m.get('temperature')}, device {m.get('device')})\n\n{_table(res)}\n")
    parts.append("\n## Limitations\n\nA single backbone and layer; targets are this backbone's own continuations. "
                 "Best-of-K needs v at inference time (it scores candidates against v). Greedy decoding is the weak point "
                 "of SRT-style AVs; compare with the NN-retrieval baseline in the same results file.\n")
    return "\n".join(parts)


def push(folder: Path, repo_id: str, private: bool) -> str:
    """Upload ``folder`` to the model repo ``repo_id``. The token is ``huggingface_hub``'s own: ``HF_TOKEN``,
    else the login saved by ``hf auth login``."""
    from huggingface_hub import HfApi, get_token, is_offline_mode

    if is_offline_mode():
        raise NLAInputError("cannot push: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset it to upload")
    if not get_token():
        raise NLAInputError("cannot push: no Hub token; run `hf auth login` or set HF_TOKEN (a write token)")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="nla-space publish")
    except Exception as exc:  # network, auth, permissions: all user-fixable
        raise NLAInputError(f"cannot push to {repo_id}: {type(exc).__name__}: {exc}") from exc
    return str(getattr(info, "commit_url", info))


def training_summary(run_dir: Path, weights_dir: Path) -> str:
    """Markdown lines from a train run's ``best.json`` / ``train_config.json`` (empty when absent)."""
    lines = []
    for path in (weights_dir / "best.json", run_dir / "train_config.json"):
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            items = ", ".join(f"`{k}`={v}" for k, v in data.items() if isinstance(v, (int, float, str, bool)) and k != "targets")
            lines.append(f"- `{path.name}`: {items}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    train_dir: Path = args.run
    run_dir = train_dir / "best" if not (train_dir / "config.json").is_file() and (train_dir / "best" / "config.json").is_file() else train_dir
    if not (run_dir / "config.json").is_file():
        raise NLAInputError(f"{run_dir}: no config.json — not a trained run folder")
    weights = find_weights(run_dir)
    if weights is None:
        raise NLAInputError(f"{run_dir}: no av.safetensors or best_av.pt")
    cfg = NLAConfig.from_json(run_dir / "config.json")
    state = {k: v for k, v in load_state_dict(weights).items() if not k.startswith("backbone.")}
    if "proj.weight" not in state:
        raise CheckpointError(f"{weights}: no 'proj.weight' — not an AV checkpoint")
    d = state["proj.weight"].shape[1]
    mu = _mu(run_dir, args)
    if mu is None:
        raise NLAInputError("no μ: the run has no mu.safetensors; give --mu FILE or --targets DIR")
    if mu.numel() != d:
        raise CheckpointError(f"μ has {mu.numel()} values, the AV reads d={d}")
    found = {run_dir / "eval", train_dir / "eval", *run_dir.glob("*.json"), *args.results}
    results = list(load_results(sorted(p for p in found if p.exists())))
    out: Path = args.out
    if out.resolve() == run_dir.resolve():
        raise NLAInputError("--out must differ from --run")
    if out.exists():
        shutil.rmtree(out / "eval", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or args.push or run_dir.name
    cfg.to_json(out / "config.json")
    save_tensors(out / "av.safetensors", state, metadata={"format": "pt", "kind": "nla-prefix-av"})
    save_tensors(out / "mu.safetensors", {"mu": mu})
    old = json.loads((run_dir / "card.json").read_text(encoding="utf-8")) if (run_dir / "card.json").is_file() else {}
    fields = {"backbone": {"id": cfg.backbone_id, "revision": None, "dtype": cfg.backbone_dtype}, **old, "title": old.get("title") or name,
              "kind": "prefix", "layers": [cfg.extraction_layer], "mu_file": "mu.safetensors", "license": old.get("license") or LICENSE}
    fields.pop("av", None)  # the release folder is the AV's location
    card_id = args.push or old.get("id")
    card = Card.from_dict({**fields, "id": card_id or name}, str(run_dir / "card.json")).to_dict()
    if card_id is None:
        card.pop("id")  # opened as a folder, the card's id is the folder (nla_space.cards.card_from_folder)
    atomic_write_json(out / "card.json", card)
    eval_files: list[str] = []
    for res in results:
        fname = f"eval/{res['meta']['command'].replace('-', '_')}.json"
        n = 2
        while fname in eval_files:
            fname = f"eval/{res['meta']['command'].replace('-', '_')}_{n}.json"
            n += 1
        eval_files.append(fname)
        atomic_write_json(out / fname, res)
    atomic_write_text(out / "README.md", model_card(name, cfg, card, results, eval_files, args.push, training_summary(train_dir, run_dir)))
    print(f"publish: {out} ({len(eval_files)} eval file(s), d={d}, layer {cfg.extraction_layer})")
    if args.push:
        print(f"pushed: {push(out, args.push, args.private)}")
    return 0
