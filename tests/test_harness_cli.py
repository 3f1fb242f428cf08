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
