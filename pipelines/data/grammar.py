"""The built-in corpus: documents from a small probabilistic grammar with a known entropy.

Every word comes from one category (determiner, adjective, noun, verb, preposition) and no
word form is shared between categories, so a document has exactly one derivation and its
probability is the product of the grammar's choices. A hidden topic per document reweights
the nouns; p(doc) sums over topics. The corpus' entropy rate, sum(-log p) / sum(bytes), is
the lowest loss any model can reach on it: the end-to-end run prints how close it came.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

N_SENTENCES = range(2, 8)  # uniform: a document ends after 2..7 sentences
P_PLURAL, P_ADJ, P_PP = 0.3, 0.25, 0.35
N_TOPICS = 4
DETS = {"sg": ["the", "a", "this", "every"], "pl": ["the", "some", "these", "many"]}
ADJS = "old small green quiet brave tired happy dark loud clever sleepy red tall gentle wild busy".split()
VERBS = [
    ("see", "sees"),
    ("chase", "chases"),
    ("follow", "follows"),
    ("help", "helps"),
    ("watch", "watches"),
    ("find", "finds"),
    ("carry", "carries"),
    ("like", "likes"),
    ("visit", "visits"),
    ("call", "calls"),
    ("push", "pushes"),
    ("meet", "meets"),
    ("hear", "hears"),
    ("paint", "paints"),
    ("feed", "feeds"),
    ("greet", "greets"),
]  # (plural subject, singular subject)
NOUNS = [
    ("cat", "cats"),
    ("dog", "dogs"),
    ("fox", "foxes"),
    ("bird", "birds"),
    ("horse", "horses"),
    ("farmer", "farmers"),
    ("child", "children"),
    ("teacher", "teachers"),
    ("baker", "bakers"),
    ("sailor", "sailors"),
    ("king", "kings"),
    ("queen", "queens"),
    ("robot", "robots"),
    ("wizard", "wizards"),
    ("doctor", "doctors"),
    ("pilot", "pilots"),
    ("mouse", "mice"),
    ("goat", "goats"),
    ("owl", "owls"),
    ("frog", "frogs"),
    ("tiger", "tigers"),
    ("painter", "painters"),
    ("student", "students"),
    ("monkey", "monkeys"),
]  # (singular, plural)
PREPS = "near behind under beside past above".split()


def zipf(n: int, s: float = 1.1) -> list[float]:
    weights = [1.0 / (rank + 1) ** s for rank in range(n)]
    total = sum(weights)
    return [w / total for w in weights]


ADJ_P, VERB_P, PREP_P = zipf(len(ADJS)), zipf(len(VERBS)), zipf(len(PREPS))


def topic_noun_probs() -> list[list[float]]:
    """Each topic ranks the same nouns in its own fixed order (seeded, so always the same)."""
    base = zipf(len(NOUNS), s=1.3)
    tables = []
    for topic in range(N_TOPICS):
        order = list(range(len(NOUNS)))
        random.Random(1000 + topic).shuffle(order)
        table = [0.0] * len(NOUNS)
        for rank, noun in enumerate(order):
            table[noun] = base[rank]
        tables.append(table)
    return tables


NOUN_P = topic_noun_probs()


@dataclass
class Doc:
    text: str
    log_prob: float  # natural log of p(text) under the grammar


class _Derivation:
    """Accumulates log p of the topic-free choices and the nouns chosen, for the topic sum."""

    def __init__(self) -> None:
        self.log_p, self.nouns = 0.0, []

    def choose(self, rng: random.Random, items: list, probs: list[float]):
        i = rng.choices(range(len(items)), weights=probs)[0]
        self.log_p += math.log(probs[i])
        return items[i]

    def flip(self, rng: random.Random, p: float) -> bool:
        yes = rng.random() < p
        self.log_p += math.log(p if yes else 1 - p)
        return yes

    def total(self) -> float:
        per_topic = [sum(math.log(NOUN_P[t][n]) for n in self.nouns) for t in range(N_TOPICS)]
        return self.log_p + _logsumexp(per_topic) - math.log(N_TOPICS)


def _logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _noun_phrase(rng: random.Random, d: _Derivation, topic: int) -> tuple[list[str], str]:
    number = "pl" if d.flip(rng, P_PLURAL) else "sg"
    words = [d.choose(rng, DETS[number], [1 / len(DETS[number])] * len(DETS[number]))]
    if d.flip(rng, P_ADJ):
        words.append(d.choose(rng, ADJS, ADJ_P))
    noun = rng.choices(range(len(NOUNS)), weights=NOUN_P[topic])[0]
    d.nouns.append(noun)
    words.append(NOUNS[noun][number == "pl"])
    return words, number


def _sentence(rng: random.Random, d: _Derivation, topic: int) -> str:
    subject, number = _noun_phrase(rng, d, topic)
    verb = d.choose(rng, VERBS, VERB_P)[number == "sg"]  # agreement: zero extra entropy
    obj, _ = _noun_phrase(rng, d, topic)
    words = subject + [verb] + obj
    if d.flip(rng, P_PP):
        words += [d.choose(rng, PREPS, PREP_P)] + _noun_phrase(rng, d, topic)[0]
    text = " ".join(words) + "."
    return text[0].upper() + text[1:]


def generate_doc(seed: int, index: int) -> Doc:
    rng = random.Random(f"{seed}:{index}")
    d = _Derivation()
    topic = rng.randrange(N_TOPICS)  # hidden; summed out in d.total()
    n = d.choose(rng, list(N_SENTENCES), [1 / len(N_SENTENCES)] * len(N_SENTENCES))
    text = " ".join(_sentence(rng, d, topic) for _ in range(n))
    return Doc(text, d.total())


def write_corpus(directory: Path, num_docs: int, seed: int, docs_per_file: int = 5000) -> dict:
    """Write documents (blank-line separated) in several files plus grammar.json with the
    entropy rate. Returns the stats; reuses an existing complete corpus."""
    stats_file = directory / "grammar.json"
    if stats_file.exists():
        return json.loads(stats_file.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    nats, n_bytes = 0.0, 0
    for start in range(0, num_docs, docs_per_file):
        docs = [generate_doc(seed, i) for i in range(start, min(start + docs_per_file, num_docs))]
        nats += sum(-doc.log_prob for doc in docs)
        n_bytes += sum(len(doc.text.encode()) for doc in docs)
        (directory / f"part-{start // docs_per_file:04d}.txt").write_text("\n\n".join(d.text for d in docs) + "\n")
    stats = {
        "num_docs": num_docs,
        "seed": seed,
        "nats": nats,
        "bytes": n_bytes,
        "bits_per_byte": nats / math.log(2) / n_bytes,
    }
    stats_file.write_text(json.dumps(stats, indent=2) + "\n")  # written last: marks completion
    return stats


def doc_log_prob(text: str) -> float:
    """Parse a generated document back into its unique derivation and return log p(text)."""
    d = _Derivation()
    sentences = text.split(". ")
    n = len(sentences)
    d.log_p += math.log(1 / len(N_SENTENCES)) if n in N_SENTENCES else -math.inf
    for sentence in sentences:
        words = sentence.rstrip(".").split(" ")
        words[0] = words[0].lower()
        _parse_sentence(words, d)
    return d.total()


def _parse_sentence(words: list[str], d: _Derivation) -> None:
    number, rest = _parse_noun_phrase(words, d)
    verbs = [v[number == "sg"] for v in VERBS]
    d.log_p += math.log(VERB_P[verbs.index(rest[0])])
    _, rest = _parse_noun_phrase(rest[1:], d)
    d.log_p += math.log(P_PP if rest else 1 - P_PP)
    if rest:
        d.log_p += math.log(PREP_P[PREPS.index(rest[0])])
        _, rest = _parse_noun_phrase(rest[1:], d)
    if rest:
        raise ValueError(f"trailing words {rest} do not fit the grammar")


def _parse_noun_phrase(words: list[str], d: _Derivation) -> tuple[str, list[str]]:
    det, *rest = words
    has_adj = rest[0] in ADJS
    noun_word = rest[1] if has_adj else rest[0]
    number = "pl" if any(noun_word == pl for _, pl in NOUNS) else "sg"
    d.log_p += math.log(P_PLURAL if number == "pl" else 1 - P_PLURAL)
    d.log_p += math.log(1 / len(DETS[number])) if det in DETS[number] else -math.inf
    d.log_p += math.log(P_ADJ if has_adj else 1 - P_ADJ)
    if has_adj:
        d.log_p += math.log(ADJ_P[ADJS.index(rest[0])])
    d.nouns.append([n[number == "pl"] for n in NOUNS].index(noun_word))
    return number, rest[2:] if has_adj else rest[1:]
