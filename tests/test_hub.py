"""Hub path, offline: a Hugging Face cache laid out as ``huggingface_hub`` lays it out
(``models--ORG--NAME/{blobs,refs,snapshots}``) serves backbones and card weights at a pinned
revision, and a repo missing from the cache is a :class:`CheckpointError` that says so."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import tiny
from nla_space.backbone import load_backbone
from nla_space.cards import Card
from nla_space.errors import CheckpointError
from nla_space.hub import is_pinned, snapshot
from nla_space.runtime import open_card
from test_prefix_av import write_release


def add_to_cache(cache: Path, repo_id: str, files_from: Path, ref: str = "main") -> str:
    """Put every file of ``files_from`` into ``cache`` as one commit of ``repo_id``; return its sha.

    Blobs are stored under their content hash and the snapshot holds relative symlinks to them,
    ``refs/<ref>`` holds the commit sha, exactly like ``huggingface_hub`` downloads.
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in files_from.rglob("*") if p.is_file())
    commit = hashlib.sha1(repo_id.encode() + b"".join(p.read_bytes() for p in files)).hexdigest()
    snap = repo / "snapshots" / commit
    for src in files:
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        dest = snap / src.relative_to(files_from)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(os.path.relpath(blob, dest.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that ``huggingface_hub`` uses (read at call time), offline."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return cache


def test_snapshot_serves_cached_repo_offline(hub_cache, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "sub").mkdir()
    (src / "sub" / "x.txt").write_text("hello")
    sha = add_to_cache(hub_cache, "org/files", src)
    for rev in (sha, "main"):
        folder = snapshot("org/files", rev, ["*.json", "*.txt"])
        assert folder.name == sha and folder.parent.parent.parent == hub_cache.resolve()
        assert (folder / "sub" / "x.txt").read_text() == "hello"


def test_backbone_loads_from_cache_at_pinned_revision(hub_cache, tmp_path):
    sha = add_to_cache(hub_cache, "tiny-org/tiny-llama", tiny.save_backbone(tmp_path / "bb", "llama"))
    assert is_pinned(sha) and not is_pinned("main") and not is_pinned(None)
    bb = load_backbone("tiny-org/tiny-llama", revision=sha)
    assert bb.num_layers == 4 and bb.hidden_size == 32 and bb.bos_id == tiny.SPECIALS.index("<bos>")
    assert Path(bb.source_path).name == sha
    ref_model, _ = tiny.make_model("llama")
    torch.testing.assert_close(bb.model.lm_head.weight, ref_model.lm_head.weight)
    assert bb.tokenizer("the cat", add_special_tokens=False)["input_ids"] == [4 + tiny.WORDS.index("the"), 4 + tiny.WORDS.index("cat")]


def test_builtin_style_card_opens_from_cache(hub_cache, tmp_path):
    bb_sha = add_to_cache(hub_cache, "tiny-org/tiny-qwen2", tiny.save_backbone(tmp_path / "bb", "qwen2"))
    W, P = write_release(tmp_path / "av", d=32, num_prefix=16)
    mu = torch.randn(32)
    torch.save({"mu": mu}, tmp_path / "av" / "mu_l2.pt")
    (tmp_path / "av" / "README.md").write_text("not downloaded: not in files")
    av_sha = add_to_cache(hub_cache, "tiny-org/srt-av", tmp_path / "av")
    card = Card.from_dict(
        {
            "id": "tiny-org/srt-av",
            "kind": "prefix",
            "backbone": {"id": "tiny-org/tiny-qwen2", "revision": bb_sha, "dtype": "float32"},
            "layers": [2],
            "av": {"repo": "tiny-org/srt-av", "revision": av_sha, "files": ["config.json", "best_av.pt", "mu_l2.pt"]},
            "mu_file": "mu_l2.pt",
            "default_tau": 0.55,
        },
        "test",
    )
    oc = open_card(card)
    assert oc.trained and oc.av.cfg.num_prefix_tokens == 16
    torch.testing.assert_close(oc.av.proj.weight, W)
    torch.testing.assert_close(oc.av.prefix_embeds, P)
    torch.testing.assert_close(oc.mu, mu)
    res = oc.verbalize(text="the cat is red", k=2, seed=0, max_new_tokens=4)
    assert res.card == "tiny-org/srt-av" and res.centered and res.tau == 0.55 and len(res.candidates) == 2


def test_missing_repo_offline_is_a_checkpoint_error(hub_cache):
    with pytest.raises(CheckpointError, match="offline mode"):
        load_backbone("tiny-org/not-cached", revision="0" * 40)
    with pytest.raises(CheckpointError, match="offline mode.*not in the local cache"):
        snapshot("tiny-org/not-cached", "main", ["*.json"])


def test_cached_repo_at_other_revision_is_an_error(hub_cache, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"a": 1}))
    add_to_cache(hub_cache, "org/files", src)
    with pytest.raises(CheckpointError, match="org/files@" + "1" * 40):
        snapshot("org/files", "1" * 40, ["*.json"])
    with pytest.raises(CheckpointError, match="offline"):
        snapshot("org/files", "v2", ["*.json"])


def test_card_whose_repo_is_missing_fails_cleanly(hub_cache, tmp_path):
    bb_sha = add_to_cache(hub_cache, "tiny-org/tiny-llama2", tiny.save_backbone(tmp_path / "bb", "llama"))
    card = Card.from_dict(
        {
            "id": "tiny-org/absent-av",
            "backbone": {"id": "tiny-org/tiny-llama2", "revision": bb_sha},
            "layers": [2],
            "av": {"repo": "tiny-org/absent-av", "revision": "main", "files": ["config.json", "best_av.pt"]},
        },
        "test",
    )
    with pytest.raises(CheckpointError, match="tiny-org/absent-av.*offline"):
        open_card(card)


def test_shipped_card_file_opens_from_cache(hub_cache, tmp_path):
    """The real built-in card ``srt-llama3.2-3b`` (hub backbone and hub AV at ``main``) opens from a
    cache holding stand-ins under the real repo names: a 22-block tiny Llama and a release folder
    with the published config (layer 20, P=1)."""
    from nla_space.cards import find_card

    card = find_card("srt-llama3.2-3b")
    add_to_cache(hub_cache, card.backbone_id, tiny.save_backbone(tmp_path / "bb", "llama", layers=22))
    W, P = write_release(tmp_path / "av", d=32, layer=20)
    cfg = json.loads((tmp_path / "av" / "config.json").read_text())
    assert cfg["backbone_id"] == card.backbone_id and cfg["extraction_layer"] == card.default_layer == 20
    add_to_cache(hub_cache, card.av.repo, tmp_path / "av")
    oc = open_card("srt-llama3.2-3b")
    assert oc.trained and oc.mu is None and oc.backbone.num_layers == 22
    torch.testing.assert_close(oc.av.proj.weight, W)
    res = oc.verbalize(text="the eiffel tower is in paris", k=3, seed=0, max_new_tokens=5)
    assert res.layer == 20 and res.tau == card.default_tau and res.centered is False and len(res.candidates) == 3


def test_embedded_backbone_with_missing_chunk_package_says_how_to_install(tmp_path, monkeypatch):
    """A chunked embedded backbone installed with --no-deps fails to import its chunk packages:
    the error names the backbone and the pip command, not a bare ModuleNotFoundError."""
    from nla_space import backbone as bmod
    from nla_space.errors import NLAInputError

    pkg = tmp_path / "fake_chunked_gguf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import fake_chunked_gguf_part1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(bmod.EMBEDDED_BACKBONES, "fake-chunked",
                        {"package": "fake_chunked_gguf", "assemble": "assemble", "pip": "pip install fake-chunked-gguf"})
    monkeypatch.setenv("NLA_SPACE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(NLAInputError, match=r"fake-chunked.*incomplete.*pip install fake-chunked-gguf"):
        bmod.embedded_gguf_path("fake-chunked")
