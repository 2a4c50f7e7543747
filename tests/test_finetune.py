"""Fine-tuning: packed examples that never see each other, the loss mask, LoRA, the readers of
the shared instruction sets, and `raylm finetune` on real Ray raising a task's score."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from raylm.cli import main
from raylm.config import SftSourceSection, TemplateSection, TokenizerSection
from raylm.errors import DataError
from raylm.models import GPT, ModelConfig, load_model, save_model
from raylm.models.io import load_lora, load_weights
from raylm.models.lora import LoraConfig, apply_lora, merge_lora, trainable_counts
from raylm.pipelines.data.loader import as_batch, read_windows
from raylm.pipelines.data.sft import encode_examples, pack, prompt_text, read_source, render, turns_of
from raylm.pipelines.data.tokenizer import load_tokenizer, token_byte_lengths, train_tokenizer
from raylm.pipelines.eval.scoring import score_windows
from raylm.pipelines.eval.tasks import TaskSpec, read_examples, score
from tests.conftest import SHARED_DATA

COLORS = {
    "apple": "red",
    "banana": "yellow",
    "grass": "green",
    "sky": "blue",
    "coal": "black",
    "snow": "white",
    "carrot": "orange",
    "plum": "purple",
    "lemon": "yellow",
    "cherry": "red",
    "leaf": "green",
    "ocean": "blue",
    "crow": "black",
    "milk": "white",
    "pumpkin": "orange",
    "grape": "purple",
}
SIZES = {
    "apple": "small",
    "banana": "small",
    "grass": "small",
    "sky": "huge",
    "coal": "small",
    "snow": "huge",
    "carrot": "small",
    "plum": "small",
    "lemon": "small",
    "cherry": "tiny",
    "leaf": "small",
    "ocean": "huge",
    "crow": "small",
    "milk": "small",
    "pumpkin": "big",
    "grape": "tiny",
}
PHRASINGS = ("What color is the {}?", "What is the color of the {}?", "Name the color of the {}.")
SIZE_PHRASINGS = ("How big is the {}?", "What size is the {}?", "Name the size of the {}.")
TEMPLATE = TemplateSection()


def tiny_model(vocab: int = 64) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()


# -- packing and the loss mask ---------------------------------------------------------------


def test_packed_examples_score_as_if_each_were_alone():
    model = tiny_model()
    a, b = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 9))
    packed, _ = model(torch.cat([a, b], 1), segments=torch.tensor([[1] * 7 + [2] * 9]))
    alone_a, _ = model(a)
    alone_b, _ = model(b)
    torch.testing.assert_close(packed[0, :7], alone_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, 7:], alone_b[0], atol=1e-5, rtol=0)


def test_loss_counts_response_tokens_and_their_eos_only(tmp_path):
    tok = colors_tokenizer(tmp_path)
    examples = [
        render([("user", f"What color is the {o}?"), ("assistant", c)], TEMPLATE) for o, c in list(COLORS.items())[:3]
    ]
    encoded = encode_examples(examples, tok)
    eos = tok.token_to_id("<|endoftext|>")
    for (ids, mask), (_, color) in zip(encoded, list(COLORS.items())[:3]):
        assert ids[-1] == eos and mask[-1]  # the answer ends with a trained EOS
        assert tok.decode(ids[mask].tolist(), skip_special_tokens=True) == color
        assert tok.decode(ids[~mask].tolist()).endswith("### Response:\n")
    windows = pack(encoded, width=40, pad_id=eos)
    assert windows["tokens"].shape[0] < len(encoded) or windows["tokens"].shape[1] * len(encoded) > 40
    x, y, segments = as_batch(np.stack([windows[k] for k in ("tokens", "loss_mask", "segments")], axis=1))
    counted = y != -100
    # Counted targets are exactly the trained tokens other than each example's first token.
    expected = sum(int(m[1:].sum()) for _, m in encoded)
    assert int(counted.sum()) == expected
    assert not counted[segments == 0].any()  # padding predicts nothing


def test_each_shared_instruction_format_becomes_turns():
    first = {
        name: json.loads(open(SHARED_DATA / path).readline())
        for name, path in {
            "gsm8k": "gsm8k/train.jsonl",
            "dolly": "dolly/dolly_sample.jsonl",
            "self_instruct": "self_instruct/seed_tasks.jsonl",
        }.items()
    }
    source = SftSourceSection(paths=["x"])
    gsm8k = turns_of(first["gsm8k"], "auto", source)[0]
    assert (
        gsm8k[0] == ("user", first["gsm8k"]["question"]) and "<<" not in gsm8k[1][1] and gsm8k[1][1].endswith("#### 72")
    )
    dolly = turns_of(first["dolly"], "auto", source)[0]
    assert dolly[0][1].startswith(first["dolly"]["instruction"]) and dolly[1][1] == first["dolly"]["response"]
    instances = turns_of(first["self_instruct"], "auto", source)
    assert len(instances) == len(first["self_instruct"]["instances"])
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye."},
        ]
    }
    pieces = render(turns_of(chat, "auto", source)[0], TEMPLATE)
    assert [p for p, trained in pieces if trained] == ["Hello.", "Bye."]  # both assistant turns, nothing else


def test_bad_instruction_rows_are_counted_or_fail_with_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{not json\n{"prompt": "a"}\n{"prompt": 3, "response": "b"}\n')
    source = SftSourceSection(paths=[str(path)])
    examples, counts = read_source(source, "finetune.sft.sources.0", TEMPLATE, strict=False)
    assert len(examples) == 1
    assert counts == {
        "rows": 4,
        "examples": 1,
        "skipped_malformed_json": 1,
        "skipped_missing_field": 1,
        "skipped_wrong_type": 1,
    }
    with pytest.raises(DataError, match=r"mixed.jsonl:2: malformed_json"):
        read_source(source, "finetune.sft.sources.0", TEMPLATE, strict=True)


# -- LoRA ------------------------------------------------------------------------------------


def test_lora_starts_as_the_base_trains_adapters_only_and_merges_exactly(tmp_path):
    model = tiny_model()
    x = torch.randint(0, 64, (2, 12))
    before, _ = model(x)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=("wq", "wv", "w2")))
    adapted, _ = model(x)
    torch.testing.assert_close(adapted, before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    # rank x (in + out) per adapter: wq 32+32, wv 32+32, w2 ffn+32; two layers
    assert trainable_counts(model)[0] == 2 * 4 * (64 + 64 + model.config.ffn_width() + 32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    changed, _ = model(x)
    assert (changed - before).abs().max() > 1e-3
    from raylm.models.io import save_weights

    save_weights(
        model.config, model.state_dict(), tmp_path / "adapted", LoraConfig(rank=4, alpha=8, targets=("wq", "wv", "w2"))
    )
    reloaded, _ = load_model(tmp_path / "adapted").eval()(x)  # load_model merges the adapters
    merged, _ = merge_lora(model)(x)
    torch.testing.assert_close(reloaded, changed, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, changed, atol=1e-5, rtol=0)


# -- raylm finetune on real Ray --------------------------------------------------------------


def colors_tokenizer(directory: Path):
    """A byte-level BPE trained on the task's own text, as a base model's tokenizer would be."""
    text = [
        TEMPLATE.user.replace("{content}", p.format(o)) + TEMPLATE.assistant.replace("{content}", c)
        for o, c in COLORS.items()
        for p in PHRASINGS
    ]
    train_tokenizer(iter([text * 5]), TokenizerSection(vocab_size=300, min_frequency=1), directory / "tokenizer.json")
    return load_tokenizer(directory / "tokenizer.json")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An untrained 2-layer model with its tokenizer: a base that knows nothing of colours."""
    tmp = tmp_path_factory.mktemp("finetune")
    tok = colors_tokenizer(tmp)
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(vocab_size=64 * -(-tok.get_vocab_size() // 64), n_layer=2, n_head=2, n_embd=64, block_size=64)
    )
    save_model(model, tmp / "base")
    shutil.copyfile(tmp / "tokenizer.json", tmp / "base" / "tokenizer.json")
    (tmp / "task").mkdir()
    for name, table, phrasings in (("colors", COLORS, PHRASINGS), ("sizes", SIZES, SIZE_PHRASINGS)):
        rows = [{"prompt": p.format(o), "response": a} for o, a in table.items() for p in phrasings]
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "task" / f"{name}.jsonl").write_text(
            "".join(json.dumps({"object": o, "answer": a}) + "\n" for o, a in table.items())
        )
    return tmp


def lookup_task(name: str, question: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        kind="generate",
        path=f"{name}.jsonl",
        context=prompt_text(question, TEMPLATE),
        reference="{answer}",
        metric="exact_match_f1",
        max_new_tokens=8,
        stop=["\n", "#"],
    )


def task_score(model_dir: Path, data: Path, spec: TaskSpec) -> float:
    metrics, _ = score(
        load_model(model_dir).eval(), load_tokenizer(model_dir / "tokenizer.json"), spec, read_examples(spec, data)
    )
    return metrics["exact_match"]


def color_score(model_dir: Path, data: Path) -> float:
    return task_score(model_dir, data, lookup_task("colors", "What color is the {object}?"))


def size_score(model_dir: Path, data: Path) -> float:
    return task_score(model_dir, data, lookup_task("sizes", "How big is the {object}?"))


def finetune_args(
    tmp: Path, name: str, steps: int, lr: float, extra: list[str] = (), base: Path | None = None, data: str = "colors"
) -> list[str]:
    sets = [
        f"run.name={name}",
        f"run.output_dir={tmp / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "data.seq_len=64",
        "train.batch_size=16",
        "train.micro_batch_size=8",
        f"train.lr={lr}",
        "train.warmup_steps=3",
        f"train.max_steps={steps}",
        "train.eval_interval=10",
        f"train.checkpoint_interval={steps}",
        "train.log_interval=10",
        "finetune.sft.val_fraction=0.15",
        "eval.sample_tokens=0",
        *extra,
    ]
    return [
        "finetune",
        "--base",
        str(base or tmp / "base"),
        "--sft",
        str(tmp / f"{data}.jsonl"),
        *[x for s in sets for x in ("--set", s)],
    ]


def run_metrics(tmp: Path, name: str) -> dict:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.search_runs(
        [client.get_experiment_by_name("raylm").experiment_id], f"tags.`raylm.run_name` = '{name}'"
    )[0]
    history = client.get_metric_history(run.info.run_id, "val_loss")
    return {"run": run, "val_loss": [m.value for m in sorted(history, key=lambda m: m.step)]}


@pytest.fixture(scope="module")
def colors_tuned(ray_cluster, base) -> Path:
    assert main(finetune_args(base, "sft-full", steps=150, lr=3e-3)) == 0
    return base / "runs" / "train" / "sft-full" / "checkpoint_000150"


def test_sft_raises_the_task_score_and_leaves_prompts_unlearned(base, colors_tuned):
    """Full fine-tuning on 48 instruction rows: the colour task goes from 0 to mostly right,
    while the loss on prompt tokens (masked out) does not fall the way the answers' does."""
    assert color_score(base / "base", base / "task") == 0.0
    checkpoint = colors_tuned
    after = color_score(checkpoint, base / "task")
    prompt_before, answer_before = token_losses(base / "base", base)
    prompt_after, answer_after = token_losses(checkpoint, base)
    print(
        f"[test] colour task exact match 0 -> {after:.2f}; prompt loss {prompt_before:.2f} -> {prompt_after:.2f}, "
        f"answer loss {answer_before:.2f} -> {answer_after:.2f}"
    )
    assert after >= 0.75, after
    prompt_before, answer_before = token_losses(base / "base", base)
    prompt_after, answer_after = token_losses(checkpoint, base)
    assert answer_after < 0.2 * answer_before
    assert prompt_after > 0.5 * prompt_before  # never a target, so never learned like the answers
    m = run_metrics(base, "sft-full")
    assert m["val_loss"][-1] < m["val_loss"][0]
    assert m["run"].data.params["model.params_trainable"] == m["run"].data.params["model.params_total"]


def test_lora_teaches_a_tuned_model_a_new_task_and_merges(base, colors_tuned, tmp_path):
    """LoRA on every linear layer of the colour-tuned model, trained on the sizes task: the base
    weights stay as they were, the new task is learned, and the merged model is the same model.
    (An untrained base is no test for LoRA: its frozen, tiny embeddings cap every logit near 1.3.)"""
    before = size_score(colors_tuned, base / "task")
    lora = ["finetune.lora.enabled=true", "finetune.lora.rank=8", "finetune.lora.targets=[wq,wk,wv,wo,w1,w2,w3]"]
    assert main(finetune_args(base, "sft-lora", steps=100, lr=1e-2, extra=lora, base=colors_tuned, data="sizes")) == 0
    run_dir = base / "runs" / "train" / "sft-lora"
    checkpoint = run_dir / "checkpoint_000100"
    after = size_score(checkpoint, base / "task")
    print(f"[test] LoRA: sizes task exact match {before:.2f} -> {after:.2f}")
    assert before <= 0.25 and after >= 0.75
    assert (checkpoint / "lora.json").is_file()
    # The checkpoint holds the adapters and their AdamW moments; the base is named, not copied.
    assert json.loads((checkpoint / "base.json").read_text())["path"] == str(colors_tuned)
    shards = sum(p.stat().st_size for p in (checkpoint / "state").iterdir())
    base_bytes = sum(p.stat().st_size for p in (colors_tuned / "state").iterdir())
    print(f"[test] LoRA checkpoint shards: {shards:,} bytes; the base's: {base_bytes:,}")
    assert shards < 0.5 * base_bytes
    config = load_model(colors_tuned).config
    adapted = apply_lora(GPT(config), load_lora(checkpoint))
    load_weights(adapted, checkpoint)  # adapters unmerged: the base weights keep their names
    saved = adapted.state_dict()
    for name, tensor in load_model(colors_tuned).state_dict().items():  # the base weights are frozen
        torch.testing.assert_close(saved[name], tensor)
    params = run_metrics(base, "sft-lora")["run"].data.params
    assert int(params["model.params_trainable"]) < 0.3 * int(params["model.params_total"])
    x = torch.randint(0, 64, (2, 20))
    torch.testing.assert_close(load_model(run_dir / "merged")(x)[0], load_model(checkpoint)(x)[0])
    assert main(["export-hf", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def token_losses(model_dir: Path, tmp: Path) -> tuple[float, float]:
    """Mean next-token loss on prompt tokens and on answer tokens over the training rows."""
    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir / "tokenizer.json")
    rows = [json.loads(line) for line in (tmp / "colors.jsonl").read_text().splitlines()]
    examples = encode_examples(
        [render([("user", r["prompt"]), ("assistant", r["response"])], TEMPLATE) for r in rows], tok
    )
    sums = {False: [], True: []}
    with torch.no_grad():
        for ids, mask in examples:
            logits, _ = model(torch.from_numpy(ids[None, :-1].astype(np.int64)))
            nats = torch.nn.functional.cross_entropy(
                logits[0], torch.from_numpy(ids[1:].astype(np.int64)), reduction="none"
            )
            for trained in (False, True):
                sums[trained] += nats[torch.from_numpy(mask[1:] == trained)].tolist()
    return float(np.mean(sums[False])), float(np.mean(sums[True]))


def test_a_hugging_face_base_is_imported_once_and_starts_as_the_same_model(base, tmp_path):
    from raylm.models.hf import export_hf
    from raylm.pipelines.train.finetune import resolve_base

    hf = export_hf(base / "base", tmp_path / "hf")
    imported = resolve_base(str(hf), tmp_path / "runs")
    assert (imported / "model.json").is_file() and (imported / "tokenizer.json").is_file()
    assert resolve_base(str(hf), tmp_path / "runs") == imported  # reused, not imported again
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(load_model(imported)(x)[0], load_model(base / "base")(x)[0])
    with pytest.raises(DataError, match="neither a raylm model directory"):
        resolve_base(str(tmp_path), tmp_path / "runs")


def test_a_hugging_face_base_is_imported_again_when_its_weights_change(base, tmp_path):
    """The import is cached by what the directory holds, not by its path: new weights written
    over the old ones are imported, not served from the stale import."""
    from raylm.models.hf import export_hf
    from raylm.pipelines.train.finetune import resolve_base

    hf = export_hf(base / "base", tmp_path / "hf")
    first = resolve_base(str(hf), tmp_path / "runs")
    weights = hf / "model.safetensors"
    before = weights.stat()
    changed = load_model(base / "base")
    with torch.no_grad():
        changed.norm.weight.mul_(3.0)
    save_model(changed, tmp_path / "changed")
    shutil.copyfile(base / "base" / "tokenizer.json", tmp_path / "changed" / "tokenizer.json")
    export_hf(tmp_path / "changed", hf)  # same path, same file sizes, new weights
    assert weights.stat().st_size == before.st_size
    if weights.stat().st_mtime_ns == before.st_mtime_ns:  # a filesystem with coarse timestamps
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    second = resolve_base(str(hf), tmp_path / "runs")
    assert second != first and (first / "model.json").is_file()
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(load_model(second)(x)[0], changed(x)[0])
    assert not torch.allclose(load_model(first)(x)[0], changed(x)[0])
    (hf / "config.json").write_text(
        (hf / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06')
    )
    assert resolve_base(str(hf), tmp_path / "runs") not in (first, second)  # the config is part of the key


def test_sft_sources_given_as_uris_are_read_and_cached_through_their_filesystem(base, tmp_path, monkeypatch):
    """list_files gives a URI's files as bucket/key paths of its pyarrow filesystem; the cache
    key once stat'ed those as local paths and crashed. A local folder stands in for the bucket."""
    import pyarrow.fs as pafs

    from raylm.config import SftSection
    from raylm.pipelines.data import readers
    from raylm.pipelines.data.sft import prepare_sft

    (tmp_path / "bucket").mkdir()
    data = tmp_path / "bucket" / "colors.jsonl"
    shutil.copyfile(base / "colors.jsonl", data)
    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    monkeypatch.setattr(readers, "_list_remote", lambda uri: ([uri.removeprefix("s3://")], [], store))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # bucket/colors.jsonl is no local path from here
    sft = SftSection(sources=[SftSourceSection(paths=["s3://bucket/colors.jsonl"])], val_fraction=0.3)
    first = prepare_sft(sft, base / "tokenizer.json", 32, False, tmp_path / "runs")
    assert first.splits["train"].examples + first.splits["val"].examples == len(data.read_text().splitlines())
    assert prepare_sft(sft, base / "tokenizer.json", 32, False, tmp_path / "runs").path == first.path  # reused
    with data.open("a") as f:
        f.write(json.dumps({"prompt": "What color is the sun?", "response": "yellow"}) + "\n")
    assert prepare_sft(sft, base / "tokenizer.json", 32, False, tmp_path / "runs").path != first.path
    monkeypatch.undo()  # pyarrow's own filesystem for a file:// URI, mixed with a plain path in one source
    local = SftSection(sources=[SftSourceSection(paths=[data.as_uri(), str(base / "sizes.jsonl")])], val_fraction=0.3)
    mixed = prepare_sft(local, base / "tokenizer.json", 32, False, tmp_path / "runs")
    assert mixed.sources["colors"]["rows"] == len(data.read_text().splitlines()) + len(
        (base / "sizes.jsonl").read_text().splitlines()
    )


def test_continued_pretraining_uses_the_base_tokenizer_and_lowers_loss_on_the_new_corpus(ray_cluster, base):
    """mode cpt: a new corpus goes through `raylm prepare`'s pipeline with the base's tokenizer
    (not a new one), and training from the base lowers the validation loss on it."""
    corpus = base / "corpus.txt"
    corpus.write_text(
        "\n\n".join(
            f"Day {day}: the {o} is {c}. Every {o} I saw was {c}, like the last {o}."
            for day in range(40)
            for o, c in COLORS.items()
        )
    )
    sets = [
        f"run.output_dir={base / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{base / 'mlflow.db'}",
        "run.name=cpt",
        "finetune.mode=cpt",
        f"data.sources=[{{paths: [{corpus}]}}]",
        "data.seq_len=64",
        "data.val_fraction=0.1",
        "data.dedup.exact=false",
        "data.dedup.near=false",
        "train.batch_size=16",
        "train.micro_batch_size=8",
        "train.lr=3e-3",
        "train.warmup_steps=3",
        "train.max_steps=40",
        "train.eval_interval=20",
        "train.checkpoint_interval=40",
        "eval.sample_tokens=0",
    ]
    assert main(["finetune", "--base", str(base / "base"), *[x for s in sets for x in ("--set", s)]]) == 0
    checkpoint = base / "runs" / "train" / "cpt" / "checkpoint_000040"
    assert (checkpoint / "tokenizer.json").read_bytes() == (base / "base" / "tokenizer.json").read_bytes()
    (prepared,) = (base / "runs" / "data").glob("*/val")
    windows = torch.from_numpy(read_windows(prepared).astype(np.int64))
    token_bytes = torch.from_numpy(token_byte_lengths(load_tokenizer(checkpoint / "tokenizer.json")))
    before = score_windows(load_model(base / "base").eval(), windows, token_bytes)
    losses = run_metrics(base, "cpt")["val_loss"]
    base_loss = float(before["nats"].sum() / before["tokens"].sum())
    print(f"[test] continued pretraining: val loss {base_loss:.2f} (base) -> {losses}")
    assert losses[-1] < losses[0] and losses[-1] < 0.5 * base_loss


def test_eos_of_an_imported_llama_style_tokenizer_is_its_end_token_not_its_lowest_special():
    from tokenizers import Tokenizer, models

    from raylm.pipelines.data.tokenizer import eos_id

    tok = Tokenizer(models.WordLevel({"hello": 0}, unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])  # Llama 2's order: ids 1, 2, 3
    assert eos_id(tok) == tok.token_to_id("</s>")
