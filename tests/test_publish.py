"""publish: a Hub-ready folder with config, weights, μ, evals and a model card with valid YAML."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from eval_harness.cli import main as harness
from test_evals import eval_env  # noqa: F401  (shared fixture)


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])


@pytest.fixture(scope="module")
def published(eval_env, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("pub")
    run = root / "run"
    shutil.copytree(eval_env["card"], run)
    assert harness([str(x) for x in ["centered-eval", "--card", eval_env["card"], "--targets", eval_env["targets"], "--M", 3,
                                     "--K", 4, "--max-new-tokens", 4, "--out", run / "eval" / "centered_eval.json"]]) == 0
    out = root / "release"
    assert harness([str(x) for x in ["publish", "--run", run, "--out", out, "--targets", eval_env["targets"], "--name", "tiny-av"]]) == 0
    return {"run": run, "out": out, "root": root}


def test_folder_has_the_files(published):
    out = published["out"]
    for f in ("config.json", "av.safetensors", "mu.safetensors", "card.json", "README.md", "eval/centered_eval.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "eval/centered_eval.json").read_text())["meta"]["command"] == "centered-eval"
    from nla_space.hub import load_state_dict

    assert "proj.weight" in load_state_dict(out / "av.safetensors")
    assert load_state_dict(out / "mu.safetensors")["mu"].ndim == 1


def test_model_card_front_matter(published):
    text = (published["out"] / "README.md").read_text()
    fm = _front_matter(text)
    assert fm["license"] == "apache-2.0" and "nla-space" in fm["tags"] and fm["library_name"] == "nla-space"
    assert "base_model" not in fm  # a local tiny backbone has no Hub id
    idx = fm["model-index"][0]
    assert idx["name"] == "tiny-av"
    metrics = {m["type"]: m["value"] for m in idx["results"][0]["metrics"]}
    res = json.loads((published["out"] / "eval/centered_eval.json").read_text())
    assert metrics["adapter_cen_bestofK_mean"] == pytest.approx(res["adapter_cen_bestofK_mean"], abs=1e-4)
    assert "open_card" in text and "python -m nla_space verbalize --card" in text
    from huggingface_hub import ModelCard

    data = ModelCard(text).data  # the Hub's own parser reads the model-index back
    assert data.eval_results and {r.metric_type for r in data.eval_results} >= {"adapter_cen_bestofK_mean"}
    assert all(r.dataset_split == "test" for r in data.eval_results)


def test_release_folder_opens_as_a_card(published):
    from nla_space.runtime import open_card

    oc = open_card(str(published["out"]))
    assert oc.trained and oc.mu is not None
    assert oc.card.title == "tiny-av"


def test_base_model_for_embedded_and_hub_specs():
    from eval_harness.cmd_publish import hub_base_model

    assert hub_base_model("embedded:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"


def test_push_without_network_or_token_is_a_clear_error(published, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(published["root"] / "no-login"))  # no saved login either
    args = ["publish", "--run", str(published["run"]), "--out", str(published["root"] / "r2"),
            "--targets", str(published["root"].parent), "--push", "someone/tiny-av"]
    # the run has no μ and --targets is not a targets folder: refused before anything is written
    assert harness(args) == 2
    assert "μ" in capsys.readouterr().err
    from eval_harness.cmd_publish import push
    from nla_space.errors import NLAInputError

    with pytest.raises(NLAInputError, match="offline|token"):
        push(published["out"], "someone/tiny-av", private=False)


def test_refuses_a_folder_without_weights(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert harness(["publish", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2


def test_train_run_folder_with_best_subfolder(eval_env, tmp_path):  # noqa: F811
    run = tmp_path / "trainrun"
    shutil.copytree(eval_env["card"], run / "best")
    shutil.copy(eval_env["targets"] / "mu.safetensors", run / "best" / "mu.safetensors")
    (run / "best" / "best.json").write_text(json.dumps({"step": 120, "val_bestofK_cen": 0.61, "targets": "x"}))
    (run / "train_config.json").write_text(json.dumps({"lr": 3e-4, "batch_size": 16}))
    out = tmp_path / "rel"
    assert harness(["publish", "--run", str(run), "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert "## Training" in text and "`step`=120" in text and "`lr`=0.0003" in text
    assert _front_matter(text)["license"] == "apache-2.0"
    assert "model-index" not in _front_matter(text)  # no eval results: no invented numbers
