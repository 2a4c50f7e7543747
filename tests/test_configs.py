"""Every file shipped under configs/ is read by the loader that reads it at run time, so a
renamed key, a moved data file or a stale usage line fails here rather than at launch.

Each kind is a glob over configs/: a new file is covered as soon as it is added, a glob that
finds nothing fails (a moved folder would otherwise test nothing), and a file no glob covers
fails too. Reading data stays cheap: the first rows of a task's set, no Ray, no torch."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from pathlib import Path

import pytest
import yaml

from raylm.config import load_config, load_raw, validate
from raylm.pipelines.eval.tasks import load_task, read_examples
from raylm.tuning.space import distribution, load_sweep, trial_config
from tests.conftest import REPO, SHARED_DATA

CONFIGS = REPO / "configs"
KINDS = {  # kind -> glob under configs/
    "pretrain": "*.yaml",  # raylm run|prepare|train|finetune CONFIG: raylm.config.load_config
    "sweep": "tune/*.yaml",  # raylm tune CONFIG --space FILE: raylm.tuning.space.load_sweep
    "task": "tasks/*.yaml",  # raylm evaluate --tasks FILE: raylm.pipelines.eval.tasks.load_task
    "task data": "tasks/*.jsonl",  # a set shipped beside its task file
    "lm-eval task": "lm_eval/*.yaml",  # raylm lm-eval --include-path configs/lm_eval: lm-eval's own loader
}
# Task files whose data is not in ../shared/data (the user downloads it; the file says where).
BRING_YOUR_OWN = {"crows_pairs.yaml"}


def shipped(kind: str) -> list[Path]:
    return sorted(CONFIGS.glob(KINDS[kind]))


def params(kind: str):
    return pytest.mark.parametrize("path", shipped(kind), ids=lambda p: p.name)


def test_every_file_under_configs_is_of_a_kind_and_every_kind_has_files():
    covered = {p for pattern in KINDS.values() for p in CONFIGS.glob(pattern)}
    stray = sorted(str(p.relative_to(REPO)) for p in CONFIGS.rglob("*") if p.is_file() and p not in covered)
    assert not stray, f"no test loads {stray}: add their kind (glob and loader) to KINDS in {__file__}"
    empty = [f"configs/{pattern}" for pattern in KINDS.values() if not list(CONFIGS.glob(pattern))]
    assert not empty, f"{empty} match no file: if the folder moved, move the glob in KINDS with it"


# -- pretraining and fine-tuning configs ------------------------------------------------------


@params("pretrain")
def test_config_loads_and_its_shared_data_paths_exist(path):
    cfg = load_config(path)
    # paths into ../shared/data are relative to the repository root, where the CLI is run
    paths = [p for s in cfg.data.sources for p in s.paths] + cfg.data.decontaminate.eval_paths
    missing = [p for p in paths if p.startswith("../shared/") and not (REPO / p).exists()]
    assert not missing, f"{path.name} names files that do not exist: {missing}"


# -- sweep files ------------------------------------------------------------------------------

USAGE = re.compile(r"raylm tune (\S+\.yaml) --space (\S+\.yaml)")


def first_values(entry) -> list:
    """The values of a space entry a test can try: every choice or grid value, the low end of a range."""
    kind, args = distribution(entry)
    return args if kind in ("choice", "grid") else [entry] if kind == "fixed" else [args[0]]


@params("sweep")
def test_sweep_file_loads_against_its_base_config_and_has_a_trial_that_trains(path):
    """As `raylm tune BASE --space FILE` reads it (raylm's cmd_tune): the base config's tree
    validated, then the sweep checked against it. BASE is the one the file's usage line names."""
    usage = USAGE.search(path.read_text())
    if usage:
        assert (REPO / usage.group(2)).resolve() == path, f"{path.name}'s usage line names {usage.group(2)}"
        base = REPO / usage.group(1)
        assert base.is_file(), f"{path.name}'s usage line names {usage.group(1)}, which does not exist"
    else:
        base = CONFIGS / "quickstart.yaml"
    raw = load_raw(base)
    validate(raw, str(base))
    spec = load_sweep(path, raw)
    keys = list(spec.space)
    trials = (dict(zip(keys, combo)) for combo in itertools.product(*(first_values(spec.space[k]) for k in keys)))
    reasons = [why for _, why in (trial_config(raw, t) for t in trials)]
    assert None in reasons, f"every trial of {path.name} would be pruned: {sorted(set(reasons))[:3]}"


# -- evaluation tasks -------------------------------------------------------------------------


@params("task")
def test_task_file_loads_and_reads_the_first_rows_of_its_set(path):
    spec = load_task(path)
    if path.name in BRING_YOUR_OWN:
        return  # the template is checked on a made-up row in tests/test_tasks.py
    data = Path(spec.path) if Path(spec.path).is_absolute() else SHARED_DATA / spec.path
    assert data.is_file(), f"{path.name}: {spec.path} is neither beside it nor in {SHARED_DATA}"
    spec.limit = 3
    examples = read_examples(spec, SHARED_DATA)
    assert len(examples) == 3 and all(ex.pairs for ex in examples)


@params("task data")
def test_task_data_shipped_beside_the_task_files_is_read_by_one(path):
    readers = [spec for spec in map(load_task, shipped("task")) if Path(spec.path) == path.resolve()]
    assert readers, f"{path.name}: no file in configs/tasks/ reads it (its `path:` would be {path.name})"
    for spec in readers:
        rows = sum(1 for line in path.read_text().splitlines() if line.strip())
        assert len(read_examples(spec, SHARED_DATA)) == (spec.limit or rows)


# -- lm-evaluation-harness tasks --------------------------------------------------------------

OUTPUT_TYPES = {"loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until"}


@params("lm-eval task")
def test_lm_eval_task_has_the_fields_lm_eval_needs_and_its_data(path):
    """What lm-eval's TaskConfig needs to build the task, checked without importing lm_eval
    (~2 s): a name, a dataset, an output type it knows, an evaluation split, the prompt and
    target templates (and the options for multiple choice), and metrics that name a metric."""
    cfg = yaml.safe_load(path.read_text())
    needed = {"task", "dataset_path", "output_type", "doc_to_text", "doc_to_target"}
    needed |= {"doc_to_choice"} if cfg.get("output_type") == "multiple_choice" else set()
    assert not needed - cfg.keys(), f"{path.name} lacks {sorted(needed - cfg.keys())}"
    assert cfg["output_type"] in OUTPUT_TYPES
    split = cfg.get("test_split") or cfg.get("validation_split")
    assert split, f"{path.name}: lm-eval needs test_split or validation_split"
    assert all("metric" in m for m in cfg.get("metric_list") or [])
    if cfg["dataset_path"] in ("json", "csv", "text"):  # local files, relative to the repository root
        files = cfg["dataset_kwargs"]["data_files"]
        assert split in files, f"{path.name}: split {split!r} is not in dataset_kwargs.data_files"
        for file in [files[split]] if isinstance(files[split], str) else files[split]:
            assert (REPO / file).is_file(), f"{path.name}: {file} not found from the repository root"
            if cfg["dataset_path"] == "json":
                row = json.loads((REPO / file).read_text().split("\n", 1)[0])
                templates = " ".join(str(cfg.get(k, "")) for k in ("doc_to_text", "doc_to_target", "doc_to_choice"))
                fields = set(re.findall(r"{{\s*(\w+)", templates))
                assert fields <= row.keys(), f"{path.name} names fields {sorted(fields - row.keys())} its rows lack"


def lm_eval_task_fields() -> set[str]:
    """The fields of lm-eval's TaskConfig, read from its source (importing lm_eval takes ~2 s)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        pytest.skip("lm-eval is not installed (pip install 'raylm[lm-eval]')")
    root = Path(spec.origin).parent
    for candidate in ("config/task.py", "api/task.py"):  # 0.4.13 / earlier 0.4 releases
        text = (root / candidate).read_text() if (root / candidate).is_file() else ""
        if match := re.search(r"^class TaskConfig\(dict\):\n((?:    .*\n|\n)*)", text, flags=re.M):
            return set(re.findall(r"^    (\w+): ", match.group(1), flags=re.M))
    raise AssertionError(f"class TaskConfig not found under {root}: update lm_eval_task_fields() for this lm-eval")


@params("lm-eval task")
def test_lm_eval_task_uses_only_keys_lm_eval_knows(path):
    fields = lm_eval_task_fields()
    assert {"task", "doc_to_text", "metric_list"} <= fields  # the scan of lm-eval's source worked
    unknown = yaml.safe_load(path.read_text()).keys() - fields
    assert not unknown, f"{path.name}: lm-eval's TaskConfig has no {sorted(unknown)}"
