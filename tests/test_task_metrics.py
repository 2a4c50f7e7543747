"""Answer scoring against hand-computed examples (SQuAD EM/F1, GSM8K numbers, BLEU, chrF,
log-likelihood choice)."""

import pytest

from raylm.pipelines.eval.task_metrics import (
    choose,
    corpus_bleu,
    corpus_chrf,
    exact_match,
    extract_number,
    gsm8k_reference,
    normalize_answer,
    numbers_equal,
    token_f1,
)


def test_squad_normalization_and_exact_match():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0


def test_token_f1_takes_the_best_reference():
    # "in december 1972" vs "december 1972": 2 common tokens, P = 2/3, R = 1 -> F1 = 0.8;
    # vs "14 december 1972 utc": P = 2/3, R = 1/2 -> 4/7. The best is kept.
    assert token_f1("in December 1972", ["14 December 1972 UTC", "December 1972"]) == pytest.approx(0.8)
    assert token_f1("in December 1972", ["14 December 1972 UTC"]) == pytest.approx(4 / 7)
    assert token_f1("no overlap", ["December 1972"]) == 0.0


def test_gsm8k_numbers():
    assert gsm8k_reference("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == 18.0
    assert gsm8k_reference("... #### 1,080") == 1080.0
    assert extract_number("Janet sells 9 eggs, so she makes $18.") == 18.0
    assert extract_number("First 3.5 hours, then 2,500 meters.") == 2500.0
    assert extract_number("#### -7\nand then 12") == -7.0  # an explicit answer wins over later numbers
    assert extract_number("no digits here") is None
    assert numbers_equal(18.0, 18) == 1.0 and numbers_equal(None, 18) == 0.0 and numbers_equal(17.9, 18) == 0.0
    with pytest.raises(ValueError):
        gsm8k_reference("no marker")


def test_bleu_on_a_hand_computed_pair():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty):
    # BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** 0.25 = 0.53728
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(53.728, abs=0.01)
    assert corpus_bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)


def test_chrf_bounds_and_order():
    assert corpus_chrf(["Ein Hund läuft."], ["Ein Hund läuft."]) == pytest.approx(100.0)
    assert corpus_chrf(["xyz"], ["abc"]) == 0.0
    close = corpus_chrf(["Ein Hund rennt."], ["Ein Hund läuft."])
    far = corpus_chrf(["Zwei Katzen."], ["Ein Hund läuft."])
    assert 0 < far < close < 100


def test_choice_raw_and_length_normalized():
    # Totals favour the short option 1; per byte, option 2 (-0.4/byte) beats 0 (-0.5) and 1 (-1.5).
    assert choose([-5.0, -3.0, -4.0], [10, 2, 10]) == (1, 2)


def bigram_model(probs):
    """A GPT whose blocks pass the residual through unchanged and whose head reads the current
    token's one-hot embedding: next-token log-probabilities are exactly log(probs[current])."""
    import math

    import torch

    from raylm.models import GPT, ModelConfig

    vocab, width = len(probs), 8
    model = GPT(ModelConfig(vocab_size=vocab, n_layer=1, n_head=2, n_embd=width, block_size=16, tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.norm, model.blocks[0].attn_norm, model.blocks[0].mlp_norm):
            norm.weight.fill_(1.0)
        model.tok_emb.weight[:, :vocab] = torch.eye(vocab)
        # RMSNorm scales a one-hot row by sqrt(width); divide it back out.
        model.lm_head.weight[:, :vocab] = torch.log(torch.tensor(probs)).T / math.sqrt(width)
    return model.eval()


def test_continuation_loglik_and_choice_on_a_model_with_known_answers():
    import math

    from raylm.pipelines.eval.scoring import continuation_logliks

    probs = [[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]
    model = bigram_model(probs)
    pairs = [([0], [1, 2]), ([0], [3]), ([3, 0], [2, 0, 1])]  # different lengths share a batch
    got = continuation_logliks(model, pairs, batch=3)
    want = [math.log(0.6 * 0.4), math.log(0.1), math.log(0.2 * 0.7 * 0.6)]
    assert [g[0] for g in got] == pytest.approx(want, abs=1e-4)
    # Greedy from 0 goes 1 (0.6) then 2 (0.4); from 2 it goes 0; 3 is never the argmax after 0.
    assert [g[1] for g in got] == [True, False, False]
    # Options after context [0]: 1 (p 0.6) beats 2 (p 0.2) and 3 (p 0.1).
    logliks = [ll for ll, _ in continuation_logliks(model, [([0], [1]), ([0], [2]), ([0], [3])])]
    assert choose(logliks, [1, 1, 1]) == (0, 0)
