import subprocess
import sys

import pytest

from raylm.cli import build_parser, main

COMMANDS = ["run", "prepare", "pretrain", "evaluate", "generate", "export-hf", "import-hf", "runs"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: raylm {command}" in out and ("--set" in out or command == "import-hf")  # import reads no config


def test_top_level_help_lists_every_subcommand():
    text = build_parser().format_help()
    assert all(c in text for c in COMMANDS)


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "raylm", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "prepare" in proc.stdout


def test_config_given_twice_is_a_user_error(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("{}\n")
    assert main(["prepare", str(f), "--config", str(f)]) == 2
    assert "either as CONFIG or as --config" in capsys.readouterr().err


def test_generate_without_checkpoint_is_a_user_error(capsys, tmp_path):
    assert main(["generate", "--set", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raylm: error: run 'quickstart' has no checkpoint") and err.count("\n") == 1
