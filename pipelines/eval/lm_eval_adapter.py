"""lm-evaluation-harness (`lm-eval`) against a raylm checkpoint: the harness's task catalogue
and metrics, raylm's model and scorer.

    lm_eval --model raylm --model_args checkpoint=runs/train/quickstart/checkpoint_000200 \\
        --tasks arc_easy_shared --include_path configs/lm_eval   # after `import raylm.pipelines.eval.lm_eval_adapter`
    raylm lm-eval --checkpoint ... --tasks arc_easy_shared --include-path configs/lm_eval

Log-likelihoods come from `scoring.continuation_logliks`, the function raylm's own
multiple-choice and cloze tasks use, on ids encoded the same way (`scoring.encode_pairs`: no
special tokens inside a continuation; an empty context is the tokenizer's BOS, else its EOS),
so the two harnesses agree on the same data (tests/test_end_to_end.py). That raylm's task
scores match lm-eval's own `hf` backend on the model's HF export, through transformers'
logits, tests/test_lm_eval_agreement.py checks. `lm-eval` is optional:
`pip install 'raylm[lm-eval]'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from raylm.models import load_model
from raylm.models.generate import generate
from raylm.pipelines.data.tokenizer import eos_id, load_tokenizer
from raylm.pipelines.eval.scoring import continuation_logliks, document_start, encode_contexts, encode_pairs
from raylm.storage import locate


@register_model("raylm")
class RaylmLM(LM):
    def __init__(self, checkpoint: str, batch_size: int | str = 16, max_gen_toks: int = 256, **_ignored):
        super().__init__()
        self.model = load_model(checkpoint).eval()
        self.tokenizer = load_tokenizer(locate(checkpoint) / "tokenizer.json")
        self.eos = eos_id(self.tokenizer)  # where a generated answer ends
        self.start = document_start(self.tokenizer)  # what a text's first token is predicted from
        self.batch = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" means the default here
        self.max_gen_toks = int(max_gen_toks)

    def encode(self, text: str) -> list[int]:
        """The text's tokens, without special tokens (no BOS)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(context, continuation) -> (log p(continuation | context), greedy?), encoded as raylm's
        tasks encode them; an empty context starts a document (BOS, else EOS)."""
        pairs = encode_pairs(self.tokenizer, [r.args for r in requests])
        return continuation_logliks(self.model, pairs, self.batch)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """A whole text's log-likelihood, in windows of the model's context that each predict new
        tokens once (lm-eval's rolling windows), the first conditioned on the document start."""
        out = []
        for (text,) in (r.args for r in requests):
            windows = get_rolling_token_windows(self.encode(text), self.start, self.model.config.block_size, 1)
            pairs = [make_disjoint_window(w) for w in windows]
            out.append(sum(ll for ll, _ in continuation_logliks(self.model, pairs, self.batch)))
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations cut at each request's first `until` string (and at EOS), decoded
        with the KV cache in batches of up to batch_size requests that share max_gen_toks,
        longest context first so that rows of a batch need little padding. A row stops once its
        text holds one of its `until` strings; the others go on."""
        asks = [self.generation(context, kwargs) for context, kwargs in (r.args for r in requests)]
        order = sorted(range(len(asks)), key=lambda i: (asks[i].budget, -len(asks[i].ids)))
        out = [""] * len(asks)
        for batch in same_budget_batches(order, [a.budget for a in asks], self.batch):
            texts = self.decode_batch([asks[i] for i in batch])
            for i, text in zip(batch, texts):
                out[i] = cut_at(text, asks[i].until)
        return out

    def generation(self, context: str, kwargs: dict) -> Generation:
        """A generate_until request as context ids, until strings and a new-token budget; the
        context keeps its last tokens, leaving room for the budget in the model's window."""
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        budget = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.model.config.block_size // 2)
        ids = encode_contexts(self.tokenizer, [context])[0][-(self.model.config.block_size - budget) :]
        return Generation(ids, until, budget)

    def decode_batch(self, asks: list[Generation]) -> list[str]:
        def stop(row: int, tokens: list[int]) -> bool:
            if not asks[row].until:
                return False
            text = self.tokenizer.decode(tokens)
            return any(u in text for u in asks[row].until)

        prompts = [a.ids for a in asks]
        tokens = generate(self.model, prompts, asks[0].budget, temperature=0, stop_tokens=(self.eos,), stop=stop)
        return [self.tokenizer.decode(t) for t in tokens]


class Generation(NamedTuple):
    ids: list[int]
    until: list[str]
    budget: int


def same_budget_batches(order: list[int], budgets: list[int], size: int) -> list[list[int]]:
    """Consecutive runs of `order` of at most `size` indices whose budgets are equal."""
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < size and budgets[batches[-1][0]] == budgets[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def cut_at(text: str, until: list[str]) -> str:
    """The text before the first of the `until` strings in it (all of it if none is)."""
    cuts = [text.find(u) for u in until if u in text]
    return text[: min(cuts)] if cuts else text


def run_lm_eval(
    checkpoint: Path, tasks: list[str], include_path: str | None, limit: int | None, num_fewshot: int | None = None
) -> dict:
    """Run lm-eval tasks on a checkpoint in this process; returns lm-eval's results dict."""
    import os

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in `ray job logs`

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return simple_evaluate(
        model=RaylmLM(str(checkpoint)),
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        bootstrap_iters=0,
    )
