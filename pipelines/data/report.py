"""The data report: what each stage did to each source, as JSON, Markdown and one plot.

Built from the pipeline's counts; the funnel adds up by construction: each stage's documents
out are its documents in minus the ones it dropped, and the last stage's output is what the
packed windows hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raylm.fmt import figure, save_figure
from raylm.pipelines.data.cleaning import TRANSFORMS
from raylm.pipelines.data.tokenizer import token_byte_lengths

READ_REASONS = (
    "empty_file",
    "blank_file",
    "binary_file",
    "corrupt_compression",
    "unreadable_parquet",
    "invalid_utf8",
    "malformed_json",
    "missing_field",
    "wrong_field_type",
)
# (stage, reasons it drops); the cleaning transforms sit between "read" and "length".
DROP_STAGES = (
    ("length", ("too_short", "too_long")),
    ("quality", ("quality_",)),
    ("dedup_exact", ("exact_duplicate",)),
    ("dedup_near", ("near_duplicate",)),
    ("decontaminate", ("contaminated",)),
    ("mix", ("mix_sampled_out",)),
)


def build_report(sources, doc_counts: dict, stats: dict, verdicts, tok, samples: list, data) -> dict:
    """stats: per split window statistics from packing.collect_summaries (tokens and bytes per source)."""
    enabled = enabled_stages(data, weighted=all(s.weight is not None for s in sources))
    per_source = {s.name: _source_report(s, i, doc_counts, stats, enabled) for i, s in enumerate(sources)}
    _add_mix_shares(per_source, sources, verdicts.repeats)
    return {
        "sources": per_source,
        "totals": _totals(per_source),
        "contamination": verdicts.contaminated,
        "contamination_checked": len(data.decontaminate.eval_paths),
        "tokenizer": _tokenizer_report(per_source, stats, tok),
        "splits": {s: {k: w[k] for k in ("windows", "tokens", "tail_tokens_dropped")} for s, w in stats.items()},
        "reject_samples": samples,
    }


def enabled_stages(data, weighted: bool) -> dict[str, bool]:
    """Which stages of the funnel ran; the others pass everything through and are not shown."""
    c, d = data.clean, data.dedup
    return {
        "read": True,
        "normalize": c.normalize,
        "scrub_pii": c.scrub_pii,
        "lowercase": c.lowercase,
        "remove_stopwords": c.remove_stopwords,
        "length": True,
        "quality": c.quality.enabled,
        "dedup_exact": d.exact,
        "dedup_near": d.near,
        "decontaminate": bool(data.decontaminate.eval_paths),
        "mix": weighted,
    }


def _rows(doc_counts: dict, source: str):
    for key, c in doc_counts.items():
        src, reason, split = key.split("\t")
        if src == source:
            yield reason, split, c


def _source_report(source, index: int, doc_counts: dict, stats: dict, enabled: dict) -> dict:
    rows = list(_rows(doc_counts, source.name))
    fixes = {r.removeprefix("fixed:"): c["rows"] for r, _, c in rows if r.startswith("fixed:")}
    docs = [(r, c) for r, _, c in rows if not r.startswith("fixed:")]
    rejects = {
        r: {"docs": c["rows"], "bytes": int(c["raw_bytes"] if r in READ_REASONS else c["bytes_after"][-1])}
        for r, c in docs
        if r
    }
    return {
        "files": len(source.files),
        "ignored_files": len(source.ignored),
        "ignored_examples": source.ignored[:5],
        "weight": source.weight,
        "stages": _funnel(docs, enabled),
        "rejects": rejects,
        "fixes": fixes,
        "tokens": {split: int(st["source_tokens"][index]) for split, st in stats.items()},
        "bytes": {split: int(st["source_bytes"][index]) for split, st in stats.items()},
    }


def _funnel(docs: list[tuple[str, dict]], enabled: dict) -> list[dict]:
    """Documents and bytes into and out of every stage, in pipeline order."""
    all_docs = sum(c["rows"] for _, c in docs)
    read_ok = [(r, c) for r, c in docs if r not in READ_REASONS]
    n_ok = sum(c["rows"] for _, c in read_ok)
    stages = [
        _stage("read", all_docs, n_ok, sum(c["raw_bytes"] for _, c in docs), sum(c["raw_bytes"] for _, c in read_ok))
    ]
    sizes = np.sum([c["bytes_after"] for _, c in read_ok], axis=0) if read_ok else np.zeros(len(TRANSFORMS))
    for name, size in zip(TRANSFORMS, sizes):
        stages.append(_stage(name, n_ok, n_ok, stages[-1]["bytes_out"], int(size)))
    n, size = n_ok, int(sizes[-1])
    for name, reasons in DROP_STAGES:
        dropped = [c for r, c in read_ok if r.startswith(reasons)]
        out_docs, out_bytes = (
            n - sum(c["rows"] for c in dropped),
            size - sum(int(c["bytes_after"][-1]) for c in dropped),
        )
        stages.append(_stage(name, n, out_docs, size, out_bytes))
        n, size = out_docs, out_bytes
    return [{**st, "enabled": enabled[st["stage"]]} for st in stages]


def _stage(name: str, docs_in: int, docs_out: int, bytes_in: int, bytes_out: int) -> dict:
    return {
        "stage": name,
        "docs_in": int(docs_in),
        "docs_out": int(docs_out),
        "bytes_in": int(bytes_in),
        "bytes_out": int(bytes_out),
    }


def _add_mix_shares(per_source: dict, sources, repeats: dict[str, float]) -> None:
    """Asked share of the train tokens (from weights; natural share when none are set) vs
    achieved, and the mean copies of each train document (repeats; below 1: subsampled)."""
    tokens = {name: r["tokens"].get("train", 0) for name, r in per_source.items()}
    total_tokens = sum(tokens.values()) or 1
    weighted = all(s.weight is not None for s in sources)
    total_weight = sum(s.weight for s in sources) if weighted else 1
    for s in sources:
        r = per_source[s.name]
        r["share_achieved"] = tokens[s.name] / total_tokens
        r["share_asked"] = s.weight / total_weight if weighted else None
        r["repeats"] = round(repeats[s.name], 4)


def _totals(per_source: dict) -> list[dict]:
    stages = None
    for r in per_source.values():
        if stages is None:
            stages = [dict(st) for st in r["stages"]]  # every source has the same stages
            continue
        for total, st in zip(stages, r["stages"]):
            for k in ("docs_in", "docs_out", "bytes_in", "bytes_out"):
                total[k] += st[k]
    return stages or []


def _tokenizer_report(per_source: dict, stats: dict, tok) -> dict:
    counts = stats["train"]["target_counts"]
    specials = int(sum(1 for t in tok.get_added_tokens_decoder().values() if t.special))
    bpt = {name: sum(r["bytes"].values()) / max(1, sum(r["tokens"].values())) for name, r in per_source.items()}
    all_tokens = sum(sum(r["tokens"].values()) for r in per_source.values())
    bpt["all"] = sum(sum(r["bytes"].values()) for r in per_source.values()) / max(1, all_tokens)
    used = int((counts > 0).sum())
    return {
        "vocab_size": tok.get_vocab_size(),
        "special_tokens": specials,
        "vocab_used_in_train": used,
        "vocab_used_fraction": used / tok.get_vocab_size(),
        "bytes_per_token": bpt,
        "mean_token_bytes": float(token_byte_lengths(tok).mean()),
    }


# -- output -----------------------------------------------------------------------------------------


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    plot_funnel(report, out / "report.png")


def _jsonable(value):
    return value.item() if hasattr(value, "item") else str(value)


def report_markdown(report: dict) -> str:
    lines = [
        "# Data report",
        "",
        "## All sources",
        "",
        "| stage | docs in | docs out | bytes in | bytes out |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {s['stage']} | {s['docs_in']:,} | {s['docs_out']:,} | {s['bytes_in']:,} | {s['bytes_out']:,} |"
        for s in report["totals"]
        if s["enabled"]
    ]
    lines += ["", "| split | windows | tokens | tail tokens dropped |", "|---|---:|---:|---:|"]
    lines += [
        f"| {k} | {v['windows']:,} | {v['tokens']:,} | {v['tail_tokens_dropped']:,} |"
        for k, v in report["splits"].items()
    ]
    lines.append("")
    for name, r in report["sources"].items():
        ignored = (
            f"; {r['ignored_files']} files without a readable suffix ignored, e.g. {r['ignored_examples'][:2]}"
            if r["ignored_files"]
            else ""
        )
        lines += [
            f"## Source `{name}` ({r['files']} files{ignored})",
            "",
            "| stage | docs in | docs out | bytes in | bytes out |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {s['stage']} | {s['docs_in']:,} | {s['docs_out']:,} | {s['bytes_in']:,} | {s['bytes_out']:,} |"
            for s in r["stages"]
            if s["enabled"]
        ]
        if r["rejects"]:
            lines += ["", "| dropped because | docs | bytes |", "|---|---:|---:|"]
            lines += [f"| {k} | {v['docs']:,} | {v['bytes']:,} |" for k, v in sorted(r["rejects"].items())]
        if r["fixes"]:
            lines += ["", "Repaired and kept: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["fixes"].items()))]
        asked = "natural" if r["share_asked"] is None else f"{r['share_asked']:.1%}"
        times = f"; each train document {r['repeats']:g} times on average" if r["repeats"] != 1 else ""
        lines += [
            "",
            f"Tokens: {r['tokens']}; share of train tokens: {r['share_achieved']:.1%} (asked: {asked}){times}",
            "",
        ]
    t = report["tokenizer"]
    lines += [
        "## Tokenizer",
        "",
        f"Vocabulary {t['vocab_size']:,} ({t['special_tokens']} special); "
        f"{t['vocab_used_in_train']:,} ids ({t['vocab_used_fraction']:.1%}) occur in the train windows.",
        "",
        "| source | bytes per token |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in t["bytes_per_token"].items()]
    if report["contamination"]:
        lines += ["", "## Contamination", "", "| eval set | training documents sharing an n-gram |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in sorted(report["contamination"].items())]
    elif report["contamination_checked"]:
        lines += [
            "",
            "## Contamination",
            "",
            f"No document shares an n-gram with the eval sets of {report['contamination_checked']} eval_paths entries.",
        ]
    if report["reject_samples"]:
        lines += ["", "## Samples of rejected input", "", "| reason | where | starts with |", "|---|---|---|"]
        lines += [
            f"| {s['reason']} | {s['path']}:{s['line']} | {_cell(s['snippet'])} |" for s in report["reject_samples"]
        ]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return "`" + text[:60].replace("|", "\\|").replace("\n", " ").replace("`", "'") + "`"


def plot_funnel(report: dict, path: Path) -> None:
    """Documents surviving each stage, one line per source."""
    fig, ax = figure((9, 4.5))
    for name, r in report["sources"].items():
        stages = [s for s in r["stages"] if s["enabled"]]
        ax.plot([s["stage"] for s in stages], [s["docs_out"] for s in stages], marker="o", label=name)
    ax.set_ylabel("documents surviving")
    ax.set_title("Documents through the prepare pipeline")
    ax.tick_params(axis="x", rotation=35)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
