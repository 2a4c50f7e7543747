import subprocess
import sys

import pytest

from raylm.cli import build_parser, main
from raylm.cli.common import resolve_config

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


def resolved_sources(argv: list[str]) -> list:
    """data.sources as the command's handler would resolve them, without starting it."""
    return resolve_config(build_parser().parse_args(argv)).data.sources


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain"],
        ["evaluate"],
        ["evaluate", "--follow"],
        ["finetune", "--base", "runs/base", "--set", "finetune.mode=cpt"],  # cpt: trains on data.sources
        ["tune", "--space", "configs/tune/lr_schedule.yaml"],
    ],
)
def test_every_command_that_reads_the_data_section_takes_data(argv):
    """A corpus given by flag reaches the later stages as it reached `run`: they find the data
    `prepare` wrote by these sources."""
    data = ["--data", "corpus/a.txt", "--data", "corpus/b/"]
    expected = resolved_sources(["run", *data])
    assert [s.paths for s in expected] == [["corpus/a.txt"], ["corpus/b/"]]
    assert resolved_sources([*argv, *data]) == expected


@pytest.mark.parametrize(
    "argv, unrecognized",
    [
        (["evaluate", "--data-d", "tasks/"], "--data-d"),  # once --data-dir
        (["evaluate", "--lim", "3"], "--lim"),  # once --limit
        (["run", "--dat", "corpus.txt"], "--dat"),  # once --data
        (["cluster", "render", "--inter"], "--inter"),  # once --interactive, in a nested subparser
    ],
)
def test_abbreviated_flags_are_refused(argv, unrecognized, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {unrecognized}" in capsys.readouterr().err


def test_evaluate_data_is_the_corpus_not_the_task_folder():
    args = build_parser().parse_args(["evaluate", "--data", "corpus.txt", "--data-dir", "tasks"])
    cfg = resolve_config(args)
    assert [s.paths for s in cfg.data.sources] == [["corpus.txt"]] and cfg.eval.task_data_dir == "tasks"
