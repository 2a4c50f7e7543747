import re
import subprocess
import sys
from pathlib import Path

import pytest

from raylm.config import load_config
from raylm.errors import ConfigError
from tests.conftest import REPO


def test_quickstart_values_reach_their_sections():
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    assert cfg.model.n_layer == 4 and cfg.scaling.num_workers == 2 and cfg.train.lr == 3e-3


def test_override_keeps_strings_that_look_like_numbers_for_string_fields():
    cfg = load_config(None, ["run.name=nan", "tracking.experiment=123"])
    assert cfg.run.name == "nan" and cfg.tracking.experiment == "123"
    with pytest.raises(ConfigError, match=r"train\.lr: Input should be a finite number"):
        load_config(None, ["train.lr=inf"])


def test_override_sets_nested_value_and_parses_numbers():
    cfg = load_config(
        None,
        [
            "train.lr=3e-4",
            "model.n_layer=6",
            "data.sources=[{paths: [a.txt, b.txt], weight: 2}]",
            "scaling.use_gpu=true",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.n_layer == 6
    assert cfg.data.sources[0].paths == ["a.txt", "b.txt"] and cfg.data.sources[0].weight == 2
    assert cfg.scaling.use_gpu is True


def test_unknown_key_names_full_path_and_nearest_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key train\.lrr \(did you mean train\.lr\?\)"):
        load_config(f)


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown key trian \(did you mean train\?\)"):
        load_config(None, ["trian.lr=0.1"])


def test_wrong_type_names_key_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_head: four\n")
    with pytest.raises(ConfigError, match=r"model\.n_head: .*integer.*'four'"):
        load_config(f)


def test_out_of_range_value_names_key_path():
    with pytest.raises(ConfigError, match=r"model\.n_layer: Input should be greater than 0 \(got -1\)"):
        load_config(None, ["model.n_layer=-1"])


def test_cross_section_checks():
    with pytest.raises(ConfigError, match=r"train\.batch_size=20 must be a multiple of .* = 16"):
        load_config(None, ["train.batch_size=20", "train.micro_batch_size=8", "scaling.num_workers=2"])
    with pytest.raises(ConfigError, match=r"data\.seq_len=256 exceeds model\.block_size=128"):
        load_config(None, ["data.seq_len=256"])
    with pytest.raises(ConfigError, match=r"model: n_embd=130 must be divisible by n_head=4"):
        load_config(None, ["model.n_embd=130"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_data_section_checks():
    with pytest.raises(ConfigError, match=r"data: sources: give every source a weight, or none"):
        load_config(None, ["data.sources=[{paths: [a], weight: 1}, {paths: [b]}]"])
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.paths: List should have at least 1 item"):
        load_config(None, ["data.sources=[{paths: []}]"])
    with pytest.raises(
        ConfigError, match=r"unknown key data\.sources\.0\.pathz \(did you mean data\.sources\.0\.paths\?\)"
    ):
        load_config(None, ["data.sources=[{pathz: [a]}]"])
    with pytest.raises(ConfigError, match=r"data\.dedup: num_perm=100 must be divisible by bands=16"):
        load_config(None, ["data.dedup.num_perm=100", "data.dedup.bands=16"])


def test_flat_params_use_dotted_paths():
    flat = load_config().flat()
    assert flat["model.n_layer"] == 4 and flat["data.grammar.num_docs"] == 20000


def test_cli_bad_config_is_one_line_on_stderr(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raylm", "run", str(REPO / "configs" / "quickstart.yaml"), "--set", "model.n_layer=-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("raylm: error: ") and proc.stderr.strip().count("\n") == 0
    assert "model.n_layer" in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def user_error_before_imports(args: list[str], cwd: Path, modules: tuple[str, ...] = ("ray", "torch")) -> str:
    """Run `raylm ARGS` in a fresh interpreter; assert exit status 2 with none of `modules`
    imported; return its stderr."""
    probe = (
        f"import sys; from raylm.cli import main; rc = main({args!r}); "
        f"assert rc == 2; assert not [m for m in {modules!r} if m in sys.modules], 'imported too early'"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_bad_config_fails_before_ray_or_torch_is_imported(tmp_path):
    """A bad config must not cost a cluster start: the CLI validates before importing Ray."""
    user_error_before_imports(["run", "--set", "model.n_layer=-1"], tmp_path)


def test_missing_data_path_fails_before_ray_is_imported(tmp_path):
    stderr = user_error_before_imports(["prepare", "--data", str(tmp_path / "typo.txt")], tmp_path, ("ray",))
    assert "data.sources.0.paths" in stderr and "typo.txt" in stderr and "matches no readable files" in stderr


def test_a_task_scored_during_training_is_checked_before_ray_is_imported(tmp_path):
    """A task file whose data is not under eval.task_data_dir fails `raylm run` at once, not
    at the first checkpoint the follow-evaluator scores."""
    task = REPO / "configs" / "tasks" / "arc_easy.yaml"
    args = ["run", "--set", f"eval.during_training.tasks=[{task}]", "--data-dir", str(tmp_path)]
    stderr = user_error_before_imports(args, tmp_path, ("ray",))
    assert "eval.during_training.tasks: task arc_easy" in stderr and "not found" in stderr


def test_unreachable_mlflow_server_fails_before_ray_is_imported_naming_the_address(tmp_path):
    """Nothing listens on a port just released; the password in the URI is not echoed."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://raylm:hunter2@127.0.0.1:{port}"
    stderr = user_error_before_imports(["pretrain", "--set", f"tracking.tracking_uri={uri}"], tmp_path)
    assert (
        f"tracking.tracking_uri: no MLflow server answers at http://raylm:***@127.0.0.1:{port} (connection refused)"
        in stderr
        and "hunter2" not in stderr
    )
    print(f"[test] pretrain against a closed port {port}: {stderr.strip()}")


def test_model_preset_with_overrides_beside_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {preset: 124m, n_layer: 6}\n")
    model = load_config(f).model
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size) == (6, 12, 768, 1024)
    assert load_config(f, ["model.n_embd=384"]).model.n_embd == 384  # an override beats the preset too


def test_unknown_model_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model\.preset: .*'124m'.*'llama-7b'.*\(got '125m'\)"):
        load_config(None, ["model.preset=125m"])


def test_preset_shapes_are_still_validated():
    with pytest.raises(ConfigError, match="n_embd=770 must be divisible by n_head=12"):
        load_config(None, ["model.preset=124m", "model.n_embd=770"])


@pytest.mark.parametrize(
    "args, expected",
    [
        (["finetune", "--sft", "x.jsonl"], "finetune.base: give the model to start from"),
        (["finetune", "--base", "b", "--sft", "typo.jsonl"], "finetune.sft.sources.0.paths"),
        (["finetune", "--base", "b"], "mode sft needs finetune.sft.sources"),
        (
            ["finetune", "--base", "b", "--sft", "x.jsonl", "--set", "finetune.lora.targets=[wz]"],
            "finetune.lora.targets.0",
        ),
        (
            ["finetune", "--base", "b", "--sft", "x.jsonl", "--set", "finetune.sft.template.user=no placeholder"],
            "finetune.sft.template: user must contain {content} exactly once",
        ),
        (
            ["finetune", "--base", "nowhere", "--sft", str(REPO / "pyproject.toml")],
            "nowhere is neither a raylm model directory",
        ),
    ],
)
def test_bad_finetune_input_fails_before_ray_is_imported(tmp_path, args, expected):
    probe = (
        f"import sys; from raylm.cli import main; rc = main({args!r}); "
        "assert rc == 2; assert 'ray' not in sys.modules, 'imported too early'"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stderr, proc.stderr


def test_set_reaches_into_a_list_of_sections():
    cfg = load_config(None, ["data.sources=[{paths: [a.txt]}, {paths: [b.txt]}]", "data.sources.1.split=val"])
    assert cfg.data.sources[1].split == "val" and cfg.data.sources[0].split == "auto"


def test_model_rope_scaling_validates_and_names_bad_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "model:\n  preset: llama-1b\n  rope_scaling:\n    factor: 32\n    low_freq_factor: 1\n"
        "    high_freq_factor: 4\n    original_max_position_embeddings: 8192\n"
    )
    scaling = load_config(f).model.rope_scaling
    assert (scaling.rope_type, scaling.factor, scaling.original_max_position_embeddings) == ("llama3", 32.0, 8192)
    assert load_config().model.rope_scaling is None  # plain RoPE unless a config asks
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.factor: Input should be greater than 0 \(got 0\)"):
        load_config(f, ["model.rope_scaling.factor=0"])
    with pytest.raises(
        ConfigError, match=r"model\.rope_scaling: high_freq_factor=1\.0 must exceed low_freq_factor=1\.0"
    ):
        load_config(f, ["model.rope_scaling.high_freq_factor=1"])
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.rope_type: Input should be 'llama3' \(got 'yarn'\)"):
        load_config(f, ["model.rope_scaling.rope_type=yarn"])
    with pytest.raises(
        ConfigError, match=r"unknown key model\.rope_scaling\.factr \(did you mean model\.rope_scaling\.factor\?\)"
    ):
        load_config(f, ["model.rope_scaling.factr=8"])


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://b/r", "hf://org/x", "https://host/runs", "file:///tmp/r"])
def test_output_dir_on_object_storage_is_refused_naming_the_key(uri):
    with pytest.raises(
        ConfigError, match=r"run\.output_dir: .* is a URI: .*with run\.checkpoint_dir \(s3:// or gs://\)"
    ):
        load_config(None, [f"run.output_dir={uri}"])
    assert load_config(None, ["run.output_dir=/mnt/raylm/runs"]).run.output_dir == "/mnt/raylm/runs"  # a mount
    assert load_config(None, ["run.output_dir=out/runs"]).run.output_dir == "out/runs"


@pytest.mark.parametrize("uri", ["hf://org/x", "https://host/runs", "file:///tmp/r"])
def test_checkpoint_dir_takes_paths_and_buckets_only(uri):
    with pytest.raises(ConfigError, match=r"run\.checkpoint_dir: .* a local path, a mounted volume, s3:// or gs://"):
        load_config(None, [f"run.checkpoint_dir={uri}"])
    for where in ("s3://bucket/ckpt", "gs://b/c", "/mnt/raylm/ckpt", "ckpt"):
        assert load_config(None, [f"run.checkpoint_dir={where}"]).run.checkpoint_dir == where


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.decontaminate.eval_paths=[evals/a.jsonl, 's3://b/evals/*.jsonl']", "data.decontaminate.eval_paths.1"),
        ("eval.texts=['gs://b/held_out.txt']", "eval.texts.0"),
        ("eval.task_data_dir=s3://b/tasks", "eval.task_data_dir"),
        ("tokenizer.path=hf://org/model/tokenizer.json", "tokenizer.path"),
        ("finetune.base=s3://b/base", "finetune.base"),
    ],
)
def test_uris_for_keys_read_as_local_files_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key) + r": \S+ is a URI, but this key is read as a local path"):
        load_config(None, [override])


def test_uris_stay_fine_where_pyarrow_reads_them():
    cfg = load_config(None, ["data.sources=[{paths: ['s3://b/web/*.jsonl']}]", "eval.texts=[/mnt/raylm/a.txt]"])
    assert cfg.data.sources[0].paths == ["s3://b/web/*.jsonl"] and cfg.eval.texts == ["/mnt/raylm/a.txt"]


QUICKSTART = REPO / "configs" / "quickstart.yaml"  # model: n_layer 4, n_head 4, n_embd 128, block_size 128


def test_a_preset_set_over_shape_fields_of_the_file_is_an_error_naming_them():
    with pytest.raises(
        ConfigError,
        match=r"--set model\.preset=124m conflicts with model\.n_layer, model\.n_head, model\.n_embd, "
        r"model\.block_size set in .*quickstart\.yaml.*remove them from the file or --set them too",
    ):
        load_config(QUICKSTART, ["model.preset=124m"])


def test_shape_fields_set_beside_a_preset_on_the_command_line_win():
    fields = ["model.n_head=12", "model.n_embd=768", "model.block_size=1024"]
    model = load_config(QUICKSTART, ["model.n_layer=6", "model.preset=124m", *fields]).model
    assert (model.preset, model.n_layer, model.n_head, model.n_embd, model.block_size) == ("124m", 6, 12, 768, 1024)
    model = load_config(None, ["model.preset=124m", "model.n_layer=6"]).model  # no file: nothing to conflict with
    assert (model.n_layer, model.n_embd) == (6, 768)


def test_a_file_naming_its_preset_keeps_its_fields_beside_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {preset: 124m, n_layer: 6, dropout: 0.1}\n")
    assert load_config(f).model.n_layer == 6
    assert load_config(f, ["model.preset=124m"]).model.n_layer == 6  # the same preset again: the file as it is
    with pytest.raises(ConfigError, match=r"--set model\.preset=350m conflicts with model\.n_layer set in"):
        load_config(f, ["model.preset=350m"])  # dropout is no shape field
    f.write_text("model: {n_layer: 12, n_head: 12, dropout: 0.1}\n")  # the preset's own values: no conflict
    assert load_config(f, ["model.preset=124m"]).model.n_embd == 768
