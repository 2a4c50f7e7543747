from raylm.pipelines.text import assign_split, clean, documents_of_file, split_documents


def test_clean_normalizes_and_strips_controls():
    assert clean("  Cafe\u0301\x00 \t\nnext\x07 line  \n\n") == "Café\nnext line"


def test_split_documents_by_boundary():
    text = "a b\nc\n\n  \n\nd e\n"
    assert split_documents(text, "paragraph") == ["a b\nc", "d e\n"]
    assert split_documents(text, "line")[:2] == ["a b", "c"]
    assert split_documents(text, "file") == [text]


def test_split_assignment_is_deterministic_and_near_the_fraction():
    docs = [f"document number {i}" for i in range(5000)]
    first = [assign_split(d, 0.1) for d in docs]
    assert first == [assign_split(d, 0.1) for d in docs]
    assert 0.08 < first.count("val") / len(docs) < 0.12


def test_documents_of_file_counts_bytes_and_marks_short_ones():
    row = {"bytes": "\ufeffHello there.\r\n\r\nx\r\n\r\nSecond paragraph.\n".encode(), "path": "f.txt"}
    docs = documents_of_file(row, boundary="paragraph", min_chars=2, val_fraction=0.5)
    assert [d["text"] for d in docs] == ["Hello there.", "x", "Second paragraph."]
    assert docs[1]["split"] == "drop" and {docs[0]["split"], docs[2]["split"]} <= {"train", "val"}
    assert docs[0]["n_bytes"] == len("Hello there.")
