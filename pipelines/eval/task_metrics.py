"""Scoring generated or chosen answers against references, as the standard harnesses do:
SQuAD's exact match and token F1, GSM8K's numeric answers, BLEU and chrF through sacrebleu,
and the choice a model's log-likelihoods make among options. Text in, numbers out: no model
here, so each function is checked against hand-computed examples (tests/test_task_metrics.py).
"""

from __future__ import annotations

import collections
import math
import re
import string

ARTICLES = re.compile(r"\b(a|an|the)\b")
NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 if the normalized prediction equals any normalized reference."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """The best token-overlap F1 against any reference (SQuAD's definition)."""
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(r).split()) for r in references)


def _f1(predicted: list[str], reference: list[str]) -> float:
    if not predicted or not reference:
        return float(predicted == reference)  # both empty: 1; one empty: 0
    common = sum((collections.Counter(predicted) & collections.Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def gsm8k_reference(answer: str) -> float:
    """The number after "####" in a GSM8K answer ("... #### 1,080" -> 1080.0)."""
    _, sep, tail = answer.rpartition("####")
    if not sep:
        raise ValueError("a GSM8K answer ends with '#### <number>'")
    return _to_number(tail.strip())


def extract_number(generated: str) -> float | None:
    """The model's numeric answer: the first number after "####" if it wrote one (GSM8K's
    answer format), else the last number in the text (lm-eval's gsm8k "flexible-extract");
    None if there is none."""
    if "####" in generated:
        found = NUMBER.findall(generated.rpartition("####")[2])
        if found:
            return _to_number(found[0])
    found = NUMBER.findall(generated)
    return _to_number(found[-1]) if found else None


def _to_number(text: str) -> float:
    return float(text.replace(",", "").replace("$", "").rstrip("."))


def numbers_equal(predicted: float | None, reference: float, tolerance: float = 1e-6) -> float:
    return float(predicted is not None and math.isclose(predicted, reference, rel_tol=tolerance, abs_tol=tolerance))


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenization, the WMT default), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def corpus_chrf(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus chrF (character 6-grams, beta 2), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(predictions, [references]).score)


def choose(logliks: list[float], lengths: list[int]) -> tuple[int, int]:
    """The option a model picks: by total log-likelihood (lm-eval's `acc`) and by
    log-likelihood per unit of the option's length, which does not favour short options: its
    characters for lm-eval's `acc_norm`, its UTF-8 bytes for `acc_bytes` (each option's text
    without the delimiter before it). Returns (raw choice, normalized choice)."""
    raw = max(range(len(logliks)), key=lambda i: logliks[i])
    norm = max(range(len(logliks)), key=lambda i: logliks[i] / max(1, lengths[i]))
    return raw, norm
