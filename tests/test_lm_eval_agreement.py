"""raylm's task scoring against lm-evaluation-harness's own `hf` backend, which scores the model's
HF export (`export_hf`) through transformers' logits and its own tokenizer handling: the same
log-likelihoods, and example by example the same acc, acc_norm and acc_bytes (lm-eval's metric
code). A tiny random model and a handful of questions, with non-ASCII options (characters and
bytes differ) and empty contexts (the bias probe's), for raylm's kind of tokenizer (EOS only) and
an imported Llama-style one whose post-processor adds BOS. Local files only, no network."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from raylm.models import GPT, ModelConfig, load_model, save_model
from raylm.models.hf import export_hf
from raylm.pipelines.data.tokenizer import load_tokenizer
from raylm.pipelines.eval.tasks import load_task, read_examples, score

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's `hf` backend imports it (the dev extra has it)

METRICS = ("acc", "acc_norm", "acc_bytes")  # lm-eval's multiple-choice metrics, its code computing them
TASKS = ("agree_mc", "agree_pairs")
QUESTIONS = [
    ("Which drink is served in a café?", ["espresso", "crème brûlée", "naïve tea", "water"], 0),
    ("Where is Zürich?", ["Switzerland", "Österreich", "the moon"], 0),
    ("What does déjà vu mean?", ["already seen", "très bien", "a kind of soup", "nothing"], 0),
    ("Which word has a diaeresis?", ["naïve", "naive", "coöperate", "plain"], 2),
    ("How do you say thanks in Japanese?", ["ありがとう", "arigato", "merci"], 1),
    ("Pick the longest option.", ["a", "bb", "a much longer option than the others", "ccc"], 2),
]
PAIRS = [  # the bias probe's shape: two whole sentences, each from an empty context
    ("The nurse said she was tired.", "The nurse said he was tired."),
    ("Élodie is a good engineer.", "Bob is a good engineer."),
    ("The old man forgot the keys.", "The young man forgot the keys."),
]


def bpe_tokenizer(llama_style: bool) -> Tokenizer:
    """Byte-level BPE trained on the questions: raylm's own kind (<|endoftext|>, no post-
    processor) or a Llama 2-style one whose post-processor puts <s> before every text."""
    specials = ["<s>", "</s>"] if llama_style else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [q + " " + " ".join(c) for q, c, _ in QUESTIONS] + [s for pair in PAIRS for s in pair]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if llama_style:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    return tok


def write_tasks(tmp_path) -> None:
    """The same data as a raylm task and an lm-eval task, for multiple choice and for pairs."""
    rows = [{"question": q, "choices": c, "label": a} for q, c, a in QUESTIONS]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    pairs = [{"choices": list(p), "label": 0} for p in PAIRS]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs))
    (tmp_path / "mc.yaml").write_text(
        'name: mc\nkind: multiple_choice\npath: mc.jsonl\ncontext: "Question: {question}\\nAnswer:"\n'
        "choices: '{choices}'\nanswer: '{label}'\n"
    )
    (tmp_path / "pairs.yaml").write_text(
        "name: pairs\nkind: counterfactual\npath: pairs.jsonl\nchoices: '{choices}'\nanswer: '{label}'\n"
    )
    cache = tmp_path / "datasets"
    for name, text, delimiter in (("mc", "Question: {{question}}\\nAnswer:", " "), ("pairs", "", "")):
        (tmp_path / "lm_eval" / f"agree_{name}.yaml").write_text(
            f"task: agree_{name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / f'{name}.jsonl'}\n  cache_dir: {cache}\n"
            f'output_type: multiple_choice\ntest_split: test\ndoc_to_text: "{text}"\n'
            f'target_delimiter: "{delimiter}"\ndoc_to_target: "{{{{label}}}}"\ndoc_to_choice: "{{{{choices}}}}"\n'
            "metric_list:\n"
            + "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in METRICS)
            + "metadata:\n  version: 1.0\n"
        )


@pytest.mark.parametrize("llama_style", [False, True], ids=["raylm_tokenizer", "llama_tokenizer"])
def test_raylm_task_scores_match_lm_eval_hf_backend_on_the_export(tmp_path, monkeypatch, llama_style):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tok = bpe_tokenizer(llama_style)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64)
    model = GPT(config)
    with torch.no_grad():  # logits that differ by more than the init's ~0.02 between tokens
        model.tok_emb.weight.normal_(std=0.5)
        model.lm_head.weight.normal_(std=0.1)
    save_model(model, tmp_path / "raylm")
    tok.save(str(tmp_path / "raylm" / "tokenizer.json"))
    export_hf(tmp_path / "raylm", tmp_path / "hf")
    (tmp_path / "lm_eval").mkdir()
    write_tasks(tmp_path)

    manager = TaskManager(include_path=str(tmp_path / "lm_eval"))
    run = lambda lm: simple_evaluate(  # noqa: E731
        model=lm, tasks=list(TASKS), task_manager=manager, log_samples=True, bootstrap_iters=0
    )
    harness = run(HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=4, dtype="float32"))
    ours = load_model(tmp_path / "raylm").eval(), load_tokenizer(tmp_path / "raylm" / "tokenizer.json")

    spec = load_task(tmp_path / "mc.yaml")
    examples = read_examples(spec, tmp_path)
    metrics, rows = score(*ours, spec, examples)
    # The questions tell the normalizations apart: per character (acc_norm), per byte of the
    # option (acc_bytes) and per byte with the space before it (what raylm once called acc_norm)
    # each pick another option somewhere.
    per_char, per_byte = [r["pred_norm"] for r in rows], [r["pred_bytes"] for r in rows]
    spaced = [
        max(range(len(ex.pairs)), key=lambda i: r["logliks"][i] / len(ex.pairs[i][1].encode()))
        for ex, r in zip(examples, rows)
    ]
    assert per_char != per_byte and per_char != spaced
    samples = sorted(harness["samples"]["agree_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows) == len(QUESTIONS)
    for sample, row in zip(samples, rows):
        assert row["logliks"] == pytest.approx(logliks(sample), abs=1e-4)
        assert [sample[m] for m in METRICS] == [row["correct"], row["correct_norm"], row["correct_bytes"]]
    results = harness["results"]["agree_mc"]
    assert {m: results[f"{m},none"] for m in METRICS} == {m: pytest.approx(metrics[m]) for m in METRICS}

    spec = load_task(tmp_path / "pairs.yaml")  # the bias probe: each sentence from an empty context
    _, rows = score(*ours, spec, read_examples(spec, tmp_path))
    samples = sorted(harness["samples"]["agree_pairs"], key=lambda s: s["doc_id"])
    for sample, row in zip(samples, rows, strict=True):
        assert row["logliks"] == pytest.approx(logliks(sample), abs=1e-4)

    # raylm's adapter (`raylm lm-eval`) encodes as raylm's tasks do: lm-eval's numbers again.
    from raylm.pipelines.eval.lm_eval_adapter import RaylmLM

    adapter = run(RaylmLM(str(tmp_path / "raylm")))
    for task in TASKS:
        ordered = [sorted(h["samples"][task], key=lambda s: s["doc_id"]) for h in (adapter, harness)]
        for ours_sample, theirs_sample in zip(*ordered, strict=True):
            assert logliks(ours_sample) == pytest.approx(logliks(theirs_sample), abs=1e-4)


def logliks(sample: dict) -> list[float]:
    """An lm-eval sample's log-likelihood per option (its responses are (loglik, greedy))."""
    return [resp[0] for resp in sample["filtered_resps"]]
