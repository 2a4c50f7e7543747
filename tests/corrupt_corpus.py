"""A corpus with every kind of bad input the readers count and reject (pipelines/data/readers.py:
EXPECTED_REJECTS below names each reason), and the counts it must produce."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

SENTENCES = [
    "The river ran past the mill before dawn.",
    "Snow covered every roof in the valley.",
    "Her letter arrived three weeks too late.",
    "Two foxes crossed the frozen lake at noon.",
    "A lantern swung above the harbour gate.",
    "The baker sold bread to the whole street.",
    "Rain drummed on the tin roof all night.",
    "They counted sheep on the northern hills.",
    "An old map hung crooked in the hallway.",
    "The violinist tuned her strings in silence.",
    "Wind carried the smell of salt inland.",
    "He planted apple trees along the fence.",
]

# reason -> documents (or files) the pipeline must count under it, with the default config.
EXPECTED_REJECTS = {
    "empty_file": 1,
    "blank_file": 1,
    "binary_file": 1,
    "invalid_utf8": 2,  # one paragraph of bad.txt, one line of bad.jsonl
    "malformed_json": 2,
    "wrong_field_type": 2,
    "missing_field": 2,
    "corrupt_compression": 1,
    "too_long": 1,  # the 50 MB single line
}
EXPECTED_FIXES = {"bom_removed": 1}
EXPECTED_KEPT = 3 + 2 + 2 + 1 + 2 + 2  # good.txt, bom.txt, bad.txt, nul.txt, bad.jsonl, good.jsonl.gz


def build(root: Path, huge_line_bytes: int = 50 * 2**20) -> Path:
    root.mkdir(parents=True)
    paragraphs = lambda *ps: "\n\n".join(ps).encode()  # noqa: E731
    (root / "good.txt").write_bytes(paragraphs(SENTENCES[0], SENTENCES[1], SENTENCES[2]))
    (root / "bom.txt").write_bytes(b"\xef\xbb\xbf" + paragraphs(SENTENCES[3], SENTENCES[4]))
    (root / "bad.txt").write_bytes(
        paragraphs(SENTENCES[5], "") + b"\xff\xfe broken bytes\n\n" + paragraphs(SENTENCES[6])
    )
    (root / "nul.txt").write_bytes((SENTENCES[7]).encode().replace(b" ", b"\x00 ", 2))
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_bytes(b"\n\n   \n\t\n")
    (root / "picture.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(4096))  # binary, with a text suffix
    (root / "huge.txt").write_bytes(b"x" * huge_line_bytes)
    (root / "bad.jsonl").write_bytes(
        b"\n".join(
            [
                json.dumps({"text": SENTENCES[8]}).encode(),
                b"{not json",
                json.dumps({"text": 5}).encode(),
                json.dumps({"body": "no text field"}).encode(),
                b'{"text": "\xff invalid"}',
                b"",
                json.dumps([1, 2]).encode(),
                json.dumps({"text": ["a", "list"]}).encode(),
                b"[unclosed",
                json.dumps({"text": SENTENCES[9]}).encode(),
            ]
        )
    )
    with gzip.open(root / "good.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": SENTENCES[10]}) + "\n" + json.dumps({"text": SENTENCES[11]}) + "\n")
    (root / "broken.jsonl.gz").write_bytes(b"this is not gzip data at all")
    (root / "notes.csv").write_text("ignored,file\n")  # no readable suffix: listed as ignored
    return root
