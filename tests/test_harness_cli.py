"""Every harness command is registered and its help renders (a literal % once broke --help)."""

from __future__ import annotations

import pytest

from eval_harness.cli import COMMANDS, _available, main


def test_every_registered_command_module_exists():
    assert set(_available()) == set(COMMANDS)


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
