"""Evaluation tasks defined in YAML over local JSONL: which file, how a row becomes a prompt
and its options, which answer is right. A user adds a task without code; the formats whose
rows a template cannot express (WinoGrande's blank, LAMBADA's last word) have a named
`preprocess` step here. `configs/tasks/` holds ready files for the sets in ../shared/data.

    name: hellaswag
    kind: multiple_choice          # pick the option the model finds most likely
    path: hellaswag/hellaswag_val.jsonl   # relative to the data directory given at run time
    context: "{activity_label}: {ctx}"
    choices: "{endings}"           # a list field, or a list of templates: ["{sol1}", "{sol2}"]
    answer: "{label}"              # the index of the right option (answer_offset: 1 if 1-based)

Each example becomes (context, continuation) pairs, one per option, scored by
log-likelihood (`scoring.continuation_logliks`), as lm-evaluation-harness does; its metrics
are lm-eval's too: `acc` by total log-likelihood, `acc_norm` per character of the option
(without the space before it) and `acc_bytes` per UTF-8 byte of it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from raylm.config import Section, describe
from raylm.errors import ConfigError, DataError
from raylm.pipelines.eval.task_metrics import (
    corpus_bleu,
    corpus_chrf,
    exact_match,
    extract_number,
    gsm8k_reference,
    numbers_equal,
    token_f1,
)


class TaskSpec(Section):
    name: str = Field(min_length=1)
    # multiple_choice / cloze: options scored by log-likelihood; generate: greedy decoding
    # of an answer, scored against references by `metric`.
    # counterfactual: two sentences that differ only in a demographic term, scored whole (the
    # bias probe); `answer` names the stereotypical one where the pair set says so.
    kind: Literal["multiple_choice", "cloze", "generate", "counterfactual"]
    path: str  # JSONL, relative to the data directory
    context: str = ""  # str.format template over the row's fields
    choices: str | list[str] = []  # "{list_field}" or one template per option
    answer: str = ""  # template giving the right option's index
    answer_offset: int = 0  # subtracted from the answer: 1 for 1-based answers
    reference: str = ""  # generate: the reference answer, a template or "{list_field}"
    # exact_match_f1: SQuAD-normalized EM and token F1; numeric: the answer's number (GSM8K
    # "#### n" references); bleu_chrf: corpus BLEU and chrF (sacrebleu).
    metric: Literal["exact_match_f1", "numeric", "bleu_chrf"] = "exact_match_f1"
    max_new_tokens: int = Field(64, gt=0)
    stop: list[str] = ["\n"]  # a generated answer ends before the first of these
    target_delimiter: str = " "  # between the context and an option or answer, as lm-eval
    attribute: str = ""  # counterfactual: the attribute a pair probes (gender, age, ...), a template
    preprocess: Literal["winogrande", "lambada"] | None = None
    fewshot: int = Field(0, ge=0)  # solved examples put before each prompt (k-shot)
    fewshot_path: str | None = None  # where they come from (their first rows); required if fewshot > 0
    limit: int | None = Field(None, gt=0)  # the first N examples only


@dataclass
class Example:
    """One question: a (context, continuation) pair per option and the right option, or for
    a generate task one prompt (a single pair with no continuation) and its references."""

    pairs: list[tuple[str, str]]
    gold: int  # -1: a counterfactual pair with no stereotypical side
    references: list[str] | None = None
    attribute: str | None = None
    # The options as lm-eval's doc_to_choice gives them (no target_delimiter), whose lengths
    # normalize acc_norm and acc_bytes; None: the continuations.
    choices: list[str] | None = None

    def solved(self) -> str:
        """The example with its answer, as a k-shot demonstration."""
        context, continuation = self.pairs[self.gold]
        return context + (continuation or " " + self.references[0])


def load_task(path: str | Path) -> TaskSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"task file {path}: {err}".replace("\n", " ")) from None
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe(err, source=str(path))) from None
    if (path.parent / spec.path).is_file():  # a data file shipped beside the task file
        spec.path = str((path.parent / spec.path).resolve())
    return spec


def check_tasks(paths: list[str], data_dir: str | None, key: str) -> None:
    """Each task file parses and its data is under data_dir: checked before Ray starts, so a
    typo fails in a second rather than at the first checkpoint an evaluator scores."""
    for path in paths:
        spec = load_task(path)
        for name in (spec.path, spec.fewshot_path):
            if name and not (Path(data_dir) / name).is_file():
                raise DataError(f"{key}: task {spec.name} ({path}): {Path(data_dir) / name} not found")


def read_examples(spec: TaskSpec, data_dir: Path) -> list[Example]:
    """The task's examples, from its JSONL under data_dir, each prompt preceded by
    `fewshot` solved examples; a bad row fails naming file and line."""
    examples = _read_rows(spec, Path(data_dir) / spec.path, spec.limit)
    if not spec.fewshot:
        return examples
    if not spec.fewshot_path:
        raise ConfigError(f"task {spec.name}: fewshot={spec.fewshot} needs fewshot_path")
    prefix = "".join(d.solved() + "\n\n" for d in _read_rows(spec, Path(data_dir) / spec.fewshot_path, spec.fewshot))
    for ex in examples:
        ex.pairs = [(prefix + ctx, cont) for ctx, cont in ex.pairs]
    return examples


def _read_rows(spec: TaskSpec, path: Path, limit: int | None) -> list[Example]:
    if not path.is_file():
        raise DataError(f"task {spec.name}: {path} not found (pass the data directory that holds it)")
    examples = []
    with path.open(newline="") as f:
        for number, row in _rows(path, f):
            if limit and len(examples) == limit:
                break
            try:
                examples.append(make_example(spec, json.loads(row) if isinstance(row, str) else row))
            except (ValueError, KeyError, IndexError, TypeError) as err:
                raise DataError(f"task {spec.name}: {path}:{number}: {err.__class__.__name__}: {err}") from None
    return examples


def _rows(path: Path, f):
    """(line number, row) from CSV with a header (CrowS-Pairs' format), or (line number, line)
    from JSONL, parsed by the caller so that a malformed line fails with its number."""
    if path.suffix == ".csv":
        reader = csv.DictReader(f)
        for row in reader:
            yield reader.line_num, row
        return
    for number, line in enumerate(f, 1):
        if line.strip():
            yield number, line


def make_example(spec: TaskSpec, row: dict) -> Example:
    if spec.preprocess == "winogrande":
        return winogrande_example(row)
    if spec.preprocess == "lambada":
        return lambada_example(row)
    if spec.kind == "counterfactual":
        return counterfactual_example(spec, row)
    context = spec.context.format(**row)
    if spec.kind == "generate":
        return Example([(context, "")], 0, _options(spec.reference, row))
    options = _options(spec.choices, row)
    gold = int(spec.answer.format(**row)) - spec.answer_offset
    if not 0 <= gold < len(options):
        raise IndexError(f"answer {gold + spec.answer_offset} is not one of {len(options)} options")
    return Example([(context, spec.target_delimiter + o) for o in options], gold, choices=options)


def _options(template: str | list[str], row: dict) -> list[str]:
    """A list of templates, or one "{field}" whose value is a list (or a single value)."""
    if isinstance(template, list):
        return [c.format(**row) for c in template]
    field = template.strip()
    if not (field.startswith("{") and field.endswith("}")):
        return [template.format(**row)]
    value = row[field[1:-1]]
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError(f"{field} is an empty list")
    return [str(v) for v in values]


def counterfactual_example(spec: TaskSpec, row: dict) -> Example:
    """Each sentence is scored whole (no context): the pair differs only in the swapped term."""
    sentences = _options(spec.choices, row)
    if len(sentences) != 2:
        raise ValueError(f"a counterfactual pair has 2 sentences, got {len(sentences)}")
    label = spec.answer.format(**row).strip() if spec.answer else ""
    gold = int(label) - spec.answer_offset if label else -1
    return Example([("", s) for s in sentences], gold, attribute=spec.attribute.format(**row) or "all")


def winogrande_example(row: dict) -> Example:
    """The blank is filled with each option; the model scores what follows the blank (lm-eval's
    "partial evaluation"), so both options are judged on the same continuation."""
    before, blank, after = row["sentence"].partition("_")
    if not blank:
        raise ValueError("a WinoGrande sentence has a '_' blank")
    continuation = " " + after.strip()
    filled = [before + row["option1"], before + row["option2"]]  # lm-eval's choices for this task
    return Example([(f, continuation) for f in filled], int(row["answer"]) - 1, choices=filled)


def lambada_example(row: dict) -> Example:
    """Predict the passage's last word from the rest; one "option", right when greedy."""
    context, _, word = row["text"].rstrip().rpartition(" ")
    if not context:
        raise ValueError("a LAMBADA passage has more than one word")
    return Example([(context, " " + word)], 0)


def score(
    model, tokenizer, spec: TaskSpec, examples: list[Example], batch: int = 16
) -> tuple[dict[str, float], list[dict]]:
    """Score examples in this process: the metrics and one row per example (the results table)."""
    rows = score_rows(model, tokenizer, spec, examples, batch)
    return aggregate(spec, rows), rows


def score_rows(model, tokenizer, spec: TaskSpec, examples: list[Example], batch: int = 16) -> list[dict]:
    """Per-example results; independent per example, so shards of a task can be scored by
    different model replicas and their rows concatenated (evaluate.py does, with Ray Data)."""
    if spec.kind == "generate":
        return generation_rows(model, tokenizer, spec, examples, batch)
    rows = choice_rows(model, tokenizer, examples, batch)
    if spec.kind == "counterfactual":
        return [counterfactual_row(ex, row) for ex, row in zip(examples, rows)]
    return rows


def counterfactual_row(ex: Example, row: dict) -> dict:
    first, second = row["logliks"]
    return {
        "attribute": ex.attribute,
        "sentences": [cont for _, cont in ex.pairs],
        "logliks": row["logliks"],
        "preferred": row["pred"],
        "stereotype": ex.gold,
        "gap_nats": first - second,
    }


def choice_rows(model, tokenizer, examples: list[Example], batch: int = 16) -> list[dict]:
    """Options by total log-likelihood (`correct`), per character of the option (`correct_norm`,
    lm-eval's acc_norm, which does not favour short options) and per UTF-8 byte of it
    (`correct_bytes`, lm-eval's acc_bytes); a single-option cloze example is right when greedy
    decoding gives its continuation. Continuations are scored without special tokens; an empty
    context is the tokenizer's document start (`scoring.encode_pairs`)."""
    from raylm.pipelines.eval.scoring import continuation_logliks, encode_pairs
    from raylm.pipelines.eval.task_metrics import choose

    pairs = encode_pairs(tokenizer, [pair for ex in examples for pair in ex.pairs])
    scored = iter(continuation_logliks(model, pairs, batch))
    rows = []
    for ex in examples:
        results = [next(scored) for _ in ex.pairs]
        logliks = [ll for ll, _ in results]
        if len(ex.pairs) == 1:
            rows.append({"gold": 0, "loglik": logliks[0], "correct": results[0][1]})
            continue
        choices = ex.choices or [cont for _, cont in ex.pairs]
        raw, norm = choose(logliks, [len(c) for c in choices])
        _, per_byte = choose(logliks, [len(c.encode()) for c in choices])
        rows.append(
            {
                "gold": ex.gold,
                "pred": raw,
                "pred_norm": norm,
                "pred_bytes": per_byte,
                "logliks": logliks,
                "correct": raw == ex.gold,
                "correct_norm": norm == ex.gold,
                "correct_bytes": per_byte == ex.gold,
            }
        )
    return rows


def generation_rows(model, tokenizer, spec: TaskSpec, examples: list[Example], batch: int = 8) -> list[dict]:
    """Greedy answers, cut at the first stop string, each scored against its references."""
    answers = generate_answers(model, tokenizer, [ex.pairs[0][0] for ex in examples], spec, batch)
    rows = []
    for ex, answer in zip(examples, answers):
        row = {"prompt_end": ex.pairs[0][0][-200:], "answer": answer, "references": ex.references}
        if spec.metric == "numeric":
            ref = ex.references[0]
            row["predicted"] = extract_number(answer)
            row["correct"] = bool(
                numbers_equal(row["predicted"], gsm8k_reference(ref) if "####" in ref else float(ref))
            )
        elif spec.metric == "exact_match_f1":
            row["exact_match"], row["f1"] = exact_match(answer, ex.references), token_f1(answer, ex.references)
        rows.append(row)
    return rows


def aggregate(spec: TaskSpec, rows: list[dict]) -> dict[str, float]:
    """The task's metrics over all its rows (BLEU and chrF are corpus-level, not averages)."""
    n, mean = len(rows), lambda key: sum(r[key] for r in rows) / max(1, len(rows))  # noqa: E731
    if spec.kind == "counterfactual":
        return bias_metrics(rows)
    if spec.kind != "generate":
        return {
            "acc": mean("correct"),
            **(
                {"acc_norm": mean("correct_norm"), "acc_bytes": mean("correct_bytes")}
                if spec.kind == "multiple_choice"
                else {}
            ),
            "examples": n,
        }
    if spec.metric == "numeric":
        return {"accuracy": mean("correct"), "examples": n}
    if spec.metric == "bleu_chrf":
        answers, refs = [r["answer"] for r in rows], [r["references"][0] for r in rows]
        return {"bleu": corpus_bleu(answers, refs), "chrf": corpus_chrf(answers, refs), "examples": n}
    return {"exact_match": mean("exact_match"), "f1": mean("f1"), "examples": n}


def generate_answers(model, tokenizer, prompts: list[str], spec: TaskSpec, batch: int = 8) -> list[str]:
    from raylm.models.generate import generate
    from raylm.pipelines.data.tokenizer import eos_stop
    from raylm.pipelines.eval.scoring import encode_contexts

    # A small model's context holds at most half new tokens; a long prompt keeps its end.
    max_new = min(spec.max_new_tokens, model.config.block_size // 2)
    room = model.config.block_size - max_new
    answers = []
    for i in range(0, len(prompts), batch):
        ids = [ctx[-room:] for ctx in encode_contexts(tokenizer, prompts[i : i + batch])]
        for new in generate(
            model, ids, max_new, temperature=0, stop_tokens=eos_stop(tokenizer)
        ):  # an answer ends at EOS
            answers.append(_cut(tokenizer.decode(new), spec.stop).strip())
    return answers


def _cut(text: str, stops: list[str]) -> str:
    ends = [text.find(s) for s in stops if s and s in text]
    return text[: min(ends)] if ends else text


def bias_metrics(rows: list[dict]) -> dict[str, float]:
    """Over all pairs and per attribute: the mean |log-likelihood gap| between the two
    sentences (0: the swapped term changes nothing), the share of pairs where the first one is
    preferred (0.5: no side favoured), and where pairs name a stereotypical side, the share in
    which the model prefers it (0.5: no stereotype preference; CrowS-Pairs' metric)."""
    metrics: dict[str, float] = {"examples": len(rows)}
    for attribute in ["all", *sorted({r["attribute"] for r in rows} - {"all"})]:
        group = rows if attribute == "all" else [r for r in rows if r["attribute"] == attribute]
        suffix = "" if attribute == "all" else f"/{attribute}"
        metrics[f"mean_abs_gap_nats{suffix}"] = sum(abs(r["gap_nats"]) for r in group) / len(group)
        metrics[f"first_preferred{suffix}"] = sum(r["preferred"] == 0 for r in group) / len(group)
        labeled = [r for r in group if r["stereotype"] >= 0]
        if labeled:
            metrics[f"stereotype_rate{suffix}"] = sum(r["preferred"] == r["stereotype"] for r in labeled) / len(labeled)
    return metrics
