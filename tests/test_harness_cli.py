"""Every harness command is registered and its help renders (a literal % once broke --help)."""

from __future__ import annotations

import pytest

from eval_harness.cli import TOOLS, commands, main
from eval_harness.evals import EVALS

#: the commands of the harness (an eval added to the registry is added here too)
COMMANDS = ("targets", "train", "centered-eval", "rerank-eval", "oracle-ceiling", "leaderboard", "publish", "bench", "policy-eval",
            "roundtrip", "injection-targets", "train-av-lora", "train-ar", "train-grpo", "fit-compass", "text-corpus", "train-patch",
            "patch-release", "reading-eval", "scale-plan")


def test_every_registered_command_exists():
    assert set(commands()) == set(TOOLS) | set(EVALS) == set(COMMANDS)


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in COMMANDS])
def test_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["oracle-ceiling", "policy-eval", "roundtrip"])
def test_unwritable_output_is_refused_before_any_work(command, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    argv = [command, "--targets", str(tmp_path / "missing-targets"), "--out", str(blocker / "result.json")]
    argv += ["--backbone", str(tmp_path / "missing-backbone"), "--layer", "1"] if command == "oracle-ceiling" else ["--card", "embedded"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the results JSON") and "missing-targets" not in err
