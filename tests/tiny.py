"""Tiny random backbones and a small local tokenizer, built on the fly (no network, no downloads).

``make_tokenizer()`` is a word-level tokenizer over a fixed vocabulary with ``<bos>``, ``<eos>``,
``<pad>``, ``<unk>``; ``make_backbone(arch)`` builds a random model of a real architecture
(llama, qwen2, gemma2, phi3) small enough for CPU tests; ``save_backbone`` writes a
``save_pretrained`` folder that :func:`nla_space.backbone.load_backbone` reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the a an of to in and is was it on for with as by at from that this be are or not but his her "
    "their they we you he she cat dog house tree river city music paper code model layer word sentence "
    "red blue green small large old new fast slow happy sad one two three four five six seven eight "
    "nine ten paris france tower king queen water fire earth light dark night day time year people "
    "world story book science art history game team player food car road school student teacher "
    "computer data number language bird fish sun moon star sky sea ship war peace love hope . , ! ?"
).split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    return tok


def make_config(arch: str, vocab_size: int, layers: int = 4, hidden: int = 32):
    from transformers import Gemma2Config, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=SPECIALS.index("<bos>"),
        eos_token_id=SPECIALS.index("<eos>"),
        pad_token_id=SPECIALS.index("<pad>"),
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma2":
        return Gemma2Config(**common, head_dim=8, sliding_window=4, query_pre_attn_scalar=8)
    if arch == "phi3":
        return Phi3Config(**common)
    raise ValueError(arch)


def make_model(arch: str = "llama", layers: int = 4, hidden: int = 32, seed: int = 0):
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = make_config(arch, len(tok), layers, hidden)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager" if arch == "gemma2" else "sdpa")
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.bos_token_id = cfg.bos_token_id
    return model.eval(), tok


def make_backbone(arch: str = "llama", layers: int = 4, hidden: int = 32, seed: int = 0):
    from nla_space.backbone import from_model

    model, tok = make_model(arch, layers, hidden, seed)
    return from_model(model, tok, spec=f"tiny-{arch}")


def save_backbone(folder: Path, arch: str = "llama", layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    model, tok = make_model(arch, layers, hidden, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def make_card_folder(folder: Path, backbone_folder: Path, layer: int = 2, num_prefix_tokens: int = 1, seed: int = 0) -> Path:
    """An SRT-style card folder (``config.json`` + ``av.safetensors``) for a saved tiny backbone,
    with a randomly perturbed projection so the AV is not the identity."""
    from nla_space.backbone import load_backbone
    from nla_space.verbalizers import NLAConfig, build_prefix_av

    bb = load_backbone(str(backbone_folder))
    cfg = NLAConfig(backbone_id=str(backbone_folder), backbone_dtype="float32", extraction_layer=layer,
                    max_new_tokens=16, num_prefix_tokens=num_prefix_tokens)
    av = build_prefix_av(cfg, bb)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        av.proj.weight.add_(0.1 * torch.randn(av.proj.weight.shape, generator=g))
    av.save(folder)
    return folder


# --- Marker tokenizer (injection AVs): appended for tests/test_injection.py and test_reconstructors.py ---

MARKERS = ("★", "㈎")
CHAT_SPECIALS = ["<|user|>", "<|end|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_marker_tokenizer(corpus: list[str] | None = None, vocab_size: int = 420):
    """A byte-level BPE tokenizer trained on the fly (milliseconds), like GPT-2/Qwen/Phi-4 tokenizers:
    ``<concept>`` splits into ``<``, ``concept``, ``>`` and ``</concept>`` into ``</``, ``concept``,
    ``>``; the markers ★ and ㈎ are single (added) tokens; it has a chat template with
    ``<|user|>``/``<|end|>``/``<|assistant|>`` and decodes back to the exact text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = list(corpus or []) + [" ".join(WORDS)] * 3 + [
        "<concept></concept> <explanation></explanation> <text></text> <summary> depth 10% 25% 47% 55% 73% 96%",
    ] * 20
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS + CHAT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(text, trainer=trainer)
    tk.add_tokens([AddedToken(m, normalized=False, special=False) for m in MARKERS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        additional_special_tokens=CHAT_SPECIALS,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_marker_model(arch: str = "phi3", layers: int = 4, hidden: int = 32, seed: int = 0, corpus: list[str] | None = None):
    """A tiny random model of ``arch`` with :func:`make_marker_tokenizer`."""
    from transformers import AutoModelForCausalLM

    tok = make_marker_tokenizer(corpus)
    torch.manual_seed(seed)
    cfg = make_config(arch, len(tok), layers, hidden)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager" if arch == "gemma2" else "sdpa")
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.bos_token_id = cfg.bos_token_id
    return model.eval(), tok


#: meta keys that differ between two otherwise identical runs (times, paths, argv, commit)
VOLATILE_META = ("started", "finished", "wall_time_s", "args", "path", "git_commit")


def run_harness(args: list) -> int:
    """``python -m eval_harness`` in-process, with every argument turned into a string."""
    from eval_harness.cli import main

    return main([str(a) for a in args])


def strip_run_meta(res: dict) -> dict:
    """A results dict without its run-specific meta keys, for comparing two runs."""
    res = dict(res)
    meta = {k: v for k, v in res.pop("meta").items() if k not in VOLATILE_META}
    res["meta"] = meta
    return res


# --- Patch AVs (nla_space.verbalizers.patch): a saved tiny backbone, a perturbed LoRA, μ, pool, card file ---

PATCH_MODULES = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
SENTENCES = [
    "the cat is on the tree .", "a dog and a bird in the house", "paris is a city in france",
    "the king and the queen of the sea", "one two three four five", "music and art and history",
    "the student is happy", "a fast car on the road", "the moon and the sun in the sky .",
    "people love the old book", "water fire earth light", "the teacher of the school is sad",
]


def make_patch_card(tmp: Path, arch: str = "llama", layer: int = 2, seed: int = 0, calibration: dict | None = None,
                    default_strategy: str = "guided") -> Path:
    """A complete patch card for a saved tiny backbone: the card JSON path (AV folder beside it)."""
    import json

    from nla_space.activations import read_rows
    from nla_space.backbone import load_backbone
    from nla_space.io import save_tensors
    from nla_space.verbalizers.patch import SPEC_FILE, PatchSpec, attach

    bb_dir = save_backbone(tmp / f"bb-{arch}", arch, seed=seed)
    bb = load_backbone(str(bb_dir))
    spec = PatchSpec(layer=layer, r=4, alpha=8, max_new_tokens=12,
                     target_modules=PATCH_MODULES.get(arch, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    pm = attach(bb, spec, trainable=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    av = tmp / f"av-{arch}"
    pm.save_pretrained(str(av))
    (av / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
    rows = [list(bb.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in SENTENCES]
    V = read_rows(bb, layer, rows)
    save_tensors(av / "mu.safetensors", {"mu": V.mean(0)})
    save_tensors(av / "pool.safetensors", {"pool": V.half()})
    patch: dict = {"pool_file": "pool.safetensors", "default_strategy": default_strategy}
    if calibration:
        patch["calibration"] = calibration
    card = {"id": f"local/patch-{arch}", "kind": "patch", "backbone": {"id": str(bb_dir)}, "layers": [layer],
            "av": {"folder": str(av)}, "mu_file": "mu.safetensors", "patch": patch,
            "default_tau": calibration["tau"] if calibration else 0.5}
    path = tmp / f"card-{arch}.json"
    path.write_text(json.dumps(card))
    return path
