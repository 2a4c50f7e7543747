"""Readers and cleaning as plain functions (no Ray): every bad input gets its reason."""

import gzip
import json

import pyarrow as pa
import pytest

from raylm.config import CleanSection, QualitySection
from raylm.pipelines.data.cleaning import assign_split, clean_batch, normalize, quality_problem, scrub_pii
from raylm.pipelines.data.readers import documents_of_file, file_format, list_files, looks_binary, split_text
from tests.corrupt_corpus import build


def parse(path, fmt="auto", boundary="paragraph"):
    row = {"bytes": path.read_bytes(), "path": str(path)}
    return documents_of_file(row, "src", file_format(str(path), fmt), "text", boundary, True)


def reasons(rows):
    return [r["reason"] for r in rows]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build(tmp_path_factory.mktemp("corrupt") / "c", huge_line_bytes=2000)


def test_each_bad_file_gets_its_reason(corpus):
    assert reasons(parse(corpus / "empty.txt")) == ["empty_file"]
    assert reasons(parse(corpus / "blank.txt")) == ["blank_file"]
    assert reasons(parse(corpus / "picture.txt")) == ["binary_file"]
    assert reasons(parse(corpus / "broken.jsonl.gz")) == ["corrupt_compression"]
    assert reasons(parse(corpus / "bom.txt")) == ["fixed:bom_removed", "", ""]
    bad = parse(corpus / "bad.txt")
    assert reasons(bad) == ["", "invalid_utf8", ""] and [r["line"] for r in bad] == [1, 3, 5]
    assert "broken bytes" in bad[1]["snippet"]


def test_jsonl_rows_get_line_numbers_and_reasons(corpus):
    rows = parse(corpus / "bad.jsonl")
    assert [(r["line"], r["reason"]) for r in rows] == [
        (1, ""),
        (2, "malformed_json"),
        (3, "wrong_field_type"),
        (4, "missing_field"),
        (5, "invalid_utf8"),
        (7, "missing_field"),
        (8, "wrong_field_type"),
        (9, "malformed_json"),
        (10, ""),
    ]
    assert [r["text"] for r in parse(corpus / "good.jsonl.gz")][1] == "He planted apple trees along the fence."


def test_gutenberg_header_and_footer_are_stripped(tmp_path):
    book = tmp_path / "pg.txt"
    book.write_text(
        "Title: X\n\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nChapter one.\n\nThe end.\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\n\nLicence text.\n"
    )
    rows = parse(book)
    assert reasons(rows) == ["fixed:gutenberg_boilerplate", "", ""]
    assert [r["text"] for r in rows[1:]] == ["Chapter one.", "The end."] and rows[1]["line"] == 5


def test_parquet_with_wrong_column_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", None, "three"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    assert reasons(parse(tmp_path / "a.parquet")) == ["", "missing_field", ""]
    assert reasons(parse(tmp_path / "b.parquet")) == ["wrong_field_type"]


def test_split_text_boundaries():
    data = b"a b\nc\n\n  \n\nd e\n"
    assert list(split_text(data, "paragraph")) == [(1, b"a b\nc"), (6, b"d e")]
    assert list(split_text(data, "line")) == [(1, b"a b"), (2, b"c"), (6, b"d e")]
    assert list(split_text(data, "file")) == [(1, data)]


def test_listing_reports_ignored_files_and_reads_file_uris(corpus):
    files, ignored, fs = list_files(str(corpus))
    assert len(files) == 11 and [p.rsplit("/", 1)[1] for p in ignored] == ["notes.csv"] and fs is None
    uri_files, _, uri_fs = list_files(f"file://{corpus}/*.jsonl*")
    assert sorted(f.rsplit("/", 1)[1] for f in uri_files) == ["bad.jsonl", "broken.jsonl.gz", "good.jsonl.gz"]
    assert uri_fs is not None


def test_binary_detection_tolerates_a_stray_nul():
    assert not looks_binary(b"text with one \x00 byte in it")
    assert looks_binary(b"\x89PNG\r\n\x1a\n" + bytes(200))


def clean_one(text: str, cfg: CleanSection) -> tuple[str, str, list[int]]:
    batch = pa.table({"text": [text], "reason": [""], "snippet": [""], "raw_bytes": [len(text.encode())]})
    out = clean_batch(batch, cfg).to_pylist()[0]
    return out["text"] or out["snippet"], out["reason"], out["bytes_after"]


def test_normalize_and_pii():
    assert normalize(pa.array(["  Cafe\u0301\x00 \t\nnext\x07 line  \n\n\n\nend"])).to_pylist() == [
        "Café\nnext line\n\nend"
    ]
    text = "Mail jane.doe@example.com or call +1 555-123-4567 / (555) 987 6543; host 192.168.0.12 in 1999-2001."
    assert scrub_pii(pa.array([text, "no numbers here"])).to_pylist() == [
        "Mail <EMAIL> or call <PHONE> / <PHONE>; host <IP> in 1999-2001.",
        "no numbers here",
    ]


def test_clean_switches_and_lengths():
    text, reason, sizes = clean_one(
        "The Cat is ON the mat", CleanSection(lowercase=True, remove_stopwords=True, min_chars=5)
    )
    assert (text, reason) == ("cat mat", "") and sizes == [21, 21, 21, len("cat mat")]
    assert clean_one("tiny", CleanSection(min_chars=5))[1] == "too_short"
    assert clean_one("x" * 11, CleanSection(max_chars=10))[1:] == ("too_long", [11] * 4)
    assert clean_one("Twenty words " * 2, CleanSection(quality={"enabled": True}))[1] == "quality_word_count"


def test_gopher_heuristics():
    q = QualitySection(min_words=5)
    prose = "The river runs past the old mill and turns toward the quiet town by the sea."
    assert quality_problem(prose, q) == ""
    assert quality_problem("# # # # # # tags", q) == "quality_mean_word_length"
    assert quality_problem("word " * 3, q) == "quality_word_count"
    assert quality_problem("buy now buy now buy now buy now buy now", q) == "quality_repeated_bigram"
    assert quality_problem("1234 5678 9012 3456 7890 1122 word", q) == "quality_alpha_words"
    assert (
        quality_problem("same line here\nsame line here\nsame line here\nother one here", q)
        == "quality_duplicate_lines"
    )
    assert quality_problem("Hmm... well... yes... no... maybe... fine...", q) == "quality_symbol_ratio"


def test_split_assignment_is_deterministic_and_near_the_fractions():
    docs = [f"document number {i}" for i in range(5000)]
    first = [assign_split(d, 0.1, 0.1) for d in docs]
    assert first == [assign_split(d, 0.1, 0.1) for d in docs]
    assert 0.08 < first.count("val") / 5000 < 0.12 and 0.08 < first.count("test") / 5000 < 0.12


def test_gzip_round_trip_helper_is_real(tmp_path):
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "hello"}) + "\n")
    assert [r["text"] for r in parse(tmp_path / "x.jsonl.gz")] == ["hello"]
