import math

from raylm.pipelines.data import grammar


def test_word_forms_are_unique_across_categories():
    """Unambiguity rests on this: each word form belongs to exactly one category and number."""
    forms = (
        [w for d in grammar.DETS.values() for w in d if w != "the"]
        + grammar.ADJS
        + [f for v in grammar.VERBS for f in v]
        + [f for n in grammar.NOUNS for f in n]
        + grammar.PREPS
    )
    assert len(forms) == len(set(forms))
    assert "the" not in forms


def test_parsed_probability_equals_generated_probability():
    for i in range(300):
        doc = grammar.generate_doc(seed=7, index=i)
        assert math.isclose(grammar.doc_log_prob(doc.text), doc.log_prob, rel_tol=1e-12)


def test_probabilities_sum_to_one_over_a_noun_phrase():
    for table in grammar.NOUN_P:
        assert math.isclose(sum(table), 1.0)
    assert math.isclose(sum(grammar.ADJ_P), 1.0) and math.isclose(sum(grammar.VERB_P), 1.0)


def test_corpus_is_deterministic_and_reports_entropy(tmp_path):
    a = grammar.write_corpus(tmp_path / "a", num_docs=400, seed=3, docs_per_file=150)
    b = grammar.write_corpus(tmp_path / "b", num_docs=400, seed=3, docs_per_file=150)
    files = sorted(p.name for p in (tmp_path / "a").glob("part-*.txt"))
    assert files == ["part-0000.txt", "part-0001.txt", "part-0002.txt"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert a == b and 0.4 < a["bits_per_byte"] < 1.0
    docs = [d for f in files for d in (tmp_path / "a" / f).read_text().strip().split("\n\n")]
    assert len(docs) == 400
    nats = sum(-grammar.doc_log_prob(d) for d in docs)
    assert math.isclose(nats, a["nats"], rel_tol=1e-9)
