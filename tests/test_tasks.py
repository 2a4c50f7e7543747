"""YAML task definitions over the shared eval sets, and multiple-choice / cloze scoring with
a model whose answers are known."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from raylm.errors import ConfigError, DataError
from raylm.pipelines.eval.scoring import context_start, document_start, encode_pairs
from raylm.pipelines.eval.tasks import load_task, read_examples, score
from tests.conftest import REPO, SHARED_DATA
from tests.test_task_metrics import bigram_model

ROWS = {
    "hellaswag": 5021,
    "arc_easy": 1188,
    "arc_challenge": 586,
    "piqa": 919,
    "winogrande": 634,
    "lambada": 2577,
    "gsm8k": 660,
    "svamp": 500,
    "nq_open": 1805,
    "xquad_en": 594,
    "multi30k_en_de": 500,
    "xquad_en_es": 594,
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_shipped_task_reads_every_row_of_its_set(name):
    spec = load_task(REPO / "configs" / "tasks" / f"{name}.yaml")
    examples = read_examples(spec, SHARED_DATA)
    assert len(examples) == ROWS[name]
    for ex in examples:
        if spec.kind == "generate":
            assert ex.references and all(ex.references) and ex.pairs[0][0].endswith(":")
        else:
            assert 0 <= ex.gold < len(ex.pairs) and all(ctx and cont.startswith(" ") for ctx, cont in ex.pairs)
    if spec.fewshot:  # k solved train examples lead every prompt
        assert examples[0].pairs[0][0].count("####") == spec.fewshot


def test_winogrande_fills_the_blank_and_scores_the_rest():
    spec = load_task(REPO / "configs" / "tasks" / "winogrande.yaml")
    from raylm.pipelines.eval.tasks import make_example

    ex = make_example(
        spec, {"sentence": "Sarah beat Maria so _ got the prize.", "option1": "Sarah", "option2": "Maria", "answer": 1}
    )
    assert ex.pairs == [
        ("Sarah beat Maria so Sarah", " got the prize."),
        ("Sarah beat Maria so Maria", " got the prize."),
    ]
    assert ex.gold == 0


def word_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2, "d": 3}, unk_token="d"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_scores_match_a_model_whose_answers_are_known(tmp_path):
    # Bigram model: after "a" -> b 0.6, c 0.2; after "b" -> c 0.4; after "c" -> a 0.7.
    model = bigram_model([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    rows = [
        {"q": "a", "options": ["b", "c"], "label": 0},  # right: b is likelier
        {"q": "a", "options": ["b", "c"], "label": 1},  # wrong answer key: the model says b
        {"q": "b", "options": ["a", "c a b"], "label": 1},
    ]  # p 0.25 vs 0.4 * 0.7 * 0.6 = 0.168
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "t.yaml").write_text(
        "name: t\nkind: multiple_choice\npath: t.jsonl\ncontext: '{q}'\nchoices: '{options}'\nanswer: '{label}'\n"
    )
    spec = load_task(tmp_path / "t.yaml")
    metrics, table = score(model, word_tokenizer(), spec, read_examples(spec, tmp_path))
    assert [r["pred"] for r in table] == [0, 0, 0]
    assert metrics["acc"] == pytest.approx(1 / 3) and metrics["examples"] == 3
    # Per character (lm-eval's acc_norm) or byte, without the space: "c a b" (ln 0.168 / 5 = -0.36)
    # beats "a" (ln 0.25 / 1 = -1.39): row 3 flips.
    assert [r["pred_norm"] for r in table] == [0, 0, 1] and metrics["acc_norm"] == pytest.approx(2 / 3)
    assert [r["pred_bytes"] for r in table] == [0, 0, 1] and metrics["acc_bytes"] == pytest.approx(2 / 3)

    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "c a b"}) + "\n" + json.dumps({"text": "a c"}) + "\n")
    (tmp_path / "c.yaml").write_text("name: c\nkind: cloze\npath: c.jsonl\npreprocess: lambada\n")
    spec = load_task(tmp_path / "c.yaml")
    metrics, _ = score(model, word_tokenizer(), spec, read_examples(spec, tmp_path))
    assert metrics["acc"] == 0.5  # after "a" greedy says b (right), not c (wrong)


def test_bad_task_file_and_bad_row_are_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nkind: multiple_choise\npath: x.jsonl\n")
    with pytest.raises(ConfigError, match="kind"):
        load_task(tmp_path / "bad.yaml")
    (tmp_path / "x.jsonl").write_text(json.dumps({"q": "a", "options": ["b"], "label": 0}) + "\n{not json\n")
    (tmp_path / "x.yaml").write_text(
        "name: x\nkind: multiple_choice\npath: x.jsonl\ncontext: '{q}'\nchoices: '{options}'\nanswer: '{label}'\n"
    )
    with pytest.raises(DataError, match=r"x.jsonl:2: JSONDecodeError"):
        read_examples(load_task(tmp_path / "x.yaml"), tmp_path)


def test_generated_answers_are_cut_at_stops_and_scored(tmp_path):
    model = bigram_model([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    rows = [{"q": "a", "ref": ["b c", "x"]}, {"q": "c", "ref": ["a c"]}]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "g.yaml").write_text(
        "name: g\nkind: generate\npath: g.jsonl\ncontext: '{q}'\nreference: '{ref}'\nmax_new_tokens: 3\nstop: [' a']\n"
    )
    spec = load_task(tmp_path / "g.yaml")
    metrics, table = score(model, word_tokenizer(), spec, read_examples(spec, tmp_path))
    # Greedy: a -> b c a (cut at " a": "b c"); c -> a b c. SQuAD normalization drops the article
    # "a": "b c" vs "c" has EM 0 and F1 2/3 (P 1/2, R 1); the first answer is exact.
    assert [r["answer"] for r in table] == ["b c", "a b c"]
    assert metrics["exact_match"] == 0.5 and metrics["f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_ray_data_replicas_score_like_one_process(ray_cluster, tmp_path):
    """The evaluation job: examples of two tasks sharded over Ray Data model replicas give the
    same per-example rows and metrics as scoring them in this process."""
    from raylm.models import save_model
    from raylm.pipelines.eval.evaluate import evaluate_tasks

    model = bigram_model([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    save_model(model, tmp_path / "ckpt")
    word_tokenizer().save(str(tmp_path / "ckpt" / "tokenizer.json"))
    letters = "abcd"
    rows = [
        {"q": letters[i % 4], "options": [letters[(i + 1) % 4], letters[(i + 2) % 4]], "label": i % 2}
        for i in range(21)
    ]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "t.yaml").write_text(
        "name: t\nkind: multiple_choice\npath: t.jsonl\ncontext: '{q}'\nchoices: '{options}'\nanswer: '{label}'\n"
    )
    (tmp_path / "g.yaml").write_text(
        "name: g\nkind: generate\npath: t.jsonl\ncontext: '{q}'\nreference: '{options}'\nmax_new_tokens: 2\n"
    )
    specs = [load_task(tmp_path / "t.yaml"), load_task(tmp_path / "g.yaml")]
    results = evaluate_tasks(tmp_path / "ckpt", specs, tmp_path)
    for spec in specs:
        metrics, table = results[spec.name]
        local_metrics, local_table = score(model, word_tokenizer(), spec, read_examples(spec, tmp_path))
        assert json.loads(json.dumps(local_table)) == table and metrics == pytest.approx(local_metrics)
        assert metrics["examples"] == 21


def test_bias_probe_on_a_model_with_known_sentence_likelihoods(tmp_path):
    """Counterfactual pairs scored whole (from the start-of-document token): the gap, the side
    preferred and the stereotype rate follow from the bigram table by hand."""
    import math

    # Token 3 is <|endoftext|>: from it every token has p 0.25.
    model = bigram_model([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2, "<|endoftext|>": 3}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rows = [
        {"attribute": "x", "a": "a b", "b": "a c", "stereotype": "0"},  # 0.25*0.6 vs 0.25*0.2
        {"attribute": "y", "a": "c a", "b": "b a", "stereotype": ""},
    ]  # 0.25*0.7 vs 0.25*0.25
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = load_task(REPO / "configs" / "tasks" / "bias_pairs.yaml")
    spec.path = "p.jsonl"
    metrics, table = score(model, tok, spec, read_examples(spec, tmp_path))
    assert [r["gap_nats"] for r in table] == pytest.approx([math.log(3), math.log(2.8)], abs=1e-4)
    assert metrics["first_preferred"] == 1.0 and metrics["stereotype_rate"] == 1.0  # only pair 1 is labelled
    assert metrics["mean_abs_gap_nats/y"] == pytest.approx(math.log(2.8), abs=1e-4)
    assert "stereotype_rate/y" not in metrics and metrics["examples"] == 2


def test_bias_pair_sets_read(tmp_path):
    spec = load_task(REPO / "configs" / "tasks" / "bias_pairs.yaml")  # its JSONL ships beside it
    examples = read_examples(spec, tmp_path)
    assert len(examples) == 28 and {ex.attribute for ex in examples} == {
        "gender",
        "age",
        "nationality",
        "religion",
        "disability",
        "race",
    }
    assert {ex.gold for ex in examples if ex.attribute == "gender"} == {0, 1}
    # CrowS-Pairs' CSV: quoted fields with commas; sent_more is always the one counted.
    (tmp_path / "crows_pairs").mkdir()
    (tmp_path / "crows_pairs" / "crows_pairs_anonymized.csv").write_text(
        ",sent_more,sent_less,stereo_antistereo,bias_type,annotations,anon_writer,anon_annotators\n"
        '0,"He couldn\'t figure it out, as usual.","She couldn\'t figure it out, as usual.",stereo,gender,[],a,[]\n'
    )
    (ex,) = read_examples(load_task(REPO / "configs" / "tasks" / "crows_pairs.yaml"), tmp_path)
    assert ex.pairs[0][1] == "He couldn't figure it out, as usual." and ex.gold == 0 and ex.attribute == "gender"


# A Llama 2-style tokenizer.json: its post-processor puts <s> before every text it encodes.
LLAMA_VOCAB = {"a": 0, "b": 1, "c": 2, "</s>": 3, "<s>": 4}
# Bigram model over it: from <s> a 0.5, b 0.3, c 0.1; the rows for a, b, c as in the tests above.
LLAMA_PROBS = [
    [0.1, 0.6, 0.2, 0.05, 0.05],
    [0.25, 0.25, 0.4, 0.05, 0.05],
    [0.7, 0.1, 0.1, 0.05, 0.05],
    [0.2] * 5,
    [0.5, 0.3, 0.1, 0.05, 0.05],
]


def llama_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(LLAMA_VOCAB, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", LLAMA_VOCAB["<s>"])]
    )
    assert tok.encode("a b").ids == [4, 0, 1]  # what scoring must not put inside a continuation
    return tok


def test_llama_tokenizer_puts_bos_before_contexts_never_inside_continuations(tmp_path):
    import math

    tok = llama_tokenizer()
    assert context_start(tok) == [4] and document_start(tok) == 4
    assert encode_pairs(tok, [("a", " b c"), ("", "a b")]) == [([4, 0], [1, 2]), ([4], [0, 1])]

    model = bigram_model(LLAMA_PROBS)
    (tmp_path / "t.jsonl").write_text(json.dumps({"q": "a", "options": ["b", "c a"], "label": 0}) + "\n")
    (tmp_path / "t.yaml").write_text(
        "name: t\nkind: multiple_choice\npath: t.jsonl\ncontext: '{q}'\nchoices: '{options}'\nanswer: '{label}'\n"
    )
    spec = load_task(tmp_path / "t.yaml")
    metrics, table = score(model, tok, spec, read_examples(spec, tmp_path))
    # p(b | a) = 0.6 and p(c a | a) = 0.2 * 0.7; a BOS inside the option would add p(<s> | a) = 0.05.
    assert table[0]["logliks"] == pytest.approx([math.log(0.6), math.log(0.2 * 0.7)], abs=1e-4)
    assert metrics["acc"] == 1.0

    # LAMBADA: right when greedy decoding gives the last word, so a BOS inside it made it always 0.
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "c a b"}) + "\n" + json.dumps({"text": "a c"}) + "\n")
    (tmp_path / "c.yaml").write_text("name: c\nkind: cloze\npath: c.jsonl\npreprocess: lambada\n")
    spec = load_task(tmp_path / "c.yaml")
    metrics, table = score(model, tok, spec, read_examples(spec, tmp_path))
    assert [r["correct"] for r in table] == [True, False] and metrics["acc"] == 0.5  # after a, greedy says b


def test_bias_probe_with_a_llama_tokenizer_starts_each_sentence_from_bos(tmp_path):
    import math

    rows = [
        {"attribute": "x", "a": "a b", "b": "b a", "stereotype": "0"},  # 0.5*0.6 vs 0.3*0.25
        {"attribute": "x", "a": "c a", "b": "a c", "stereotype": ""},  # 0.1*0.7 vs 0.5*0.2
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = load_task(REPO / "configs" / "tasks" / "bias_pairs.yaml")
    spec.path = "p.jsonl"
    metrics, table = score(bigram_model(LLAMA_PROBS), llama_tokenizer(), spec, read_examples(spec, tmp_path))
    assert table[0]["logliks"] == pytest.approx([math.log(0.3), math.log(0.075)], abs=1e-4)
    assert [r["gap_nats"] for r in table] == pytest.approx([math.log(4), math.log(0.7)], abs=1e-4)
    assert metrics["first_preferred"] == 0.5 and metrics["stereotype_rate"] == 1.0


def test_document_start_is_bos_else_eos_else_a_clear_error():
    raylm_style = Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a"))
    raylm_style.add_special_tokens(["<|endoftext|>"])
    assert context_start(raylm_style) == [] and document_start(raylm_style) == 1
    # Llama 3's names, with no post-processor adding BOS: its BOS still starts a document.
    llama3 = Tokenizer(models.WordLevel({"a": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2}, unk_token="a"))
    llama3.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    assert context_start(llama3) == [] and document_start(llama3) == 1
    assert encode_pairs(llama3, [("", "a")]) == [([1], [0])]
    with pytest.raises(DataError, match="no begin- or end-of-text token"):
        document_start(word_tokenizer())


def test_acc_norm_is_lm_evals_per_character_and_acc_bytes_per_byte(tmp_path):
    """lm-eval's acc_norm divides an option's log-likelihood by the characters of the option
    without the delimiter (`len(choice)`), acc_bytes by its UTF-8 bytes: "éé" is 2 characters,
    4 bytes (5 with the space before it, which raylm's acc_norm once counted)."""
    import math

    import numpy as np

    model = bigram_model([[0.05, 0.2, 0.1, 0.65], [0.25] * 4, [0.25] * 4, [0.25] * 4])
    tok = Tokenizer(models.WordLevel({"q": 0, "éé": 1, "abc": 2, "</s>": 3}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    choices = ["éé", "abc"]
    (tmp_path / "t.jsonl").write_text(json.dumps({"q": "q", "options": choices, "label": 1}) + "\n")
    (tmp_path / "t.yaml").write_text(
        "name: t\nkind: multiple_choice\npath: t.jsonl\ncontext: '{q}'\nchoices: '{options}'\nanswer: '{label}'\n"
    )
    spec = load_task(tmp_path / "t.yaml")
    metrics, (row,) = score(model, tok, spec, read_examples(spec, tmp_path))
    lls = np.array(row["logliks"])
    assert lls == pytest.approx([math.log(0.2), math.log(0.1)], abs=1e-4)
    # lm-eval 0.4.13, ConfigurableTask.process_results for multiple_choice:
    assert row["pred"] == np.argmax(lls) == 0
    assert row["pred_norm"] == np.argmax(lls / np.array([float(len(c)) for c in choices])) == 1  # -0.80 vs -0.77
    assert row["pred_bytes"] == np.argmax(lls / np.array([float(len(c.encode())) for c in choices])) == 0
    assert np.argmax(lls / np.array([len((" " + c).encode()) for c in choices])) == 0  # the old per-byte choice
    assert (metrics["acc"], metrics["acc_norm"], metrics["acc_bytes"]) == (0.0, 1.0, 0.0)
