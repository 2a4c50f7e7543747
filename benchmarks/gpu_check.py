"""raylm's model and training parts on one GPU, without Ray or MLflow: one table of checks and
figures, exit status 1 on any mismatch.

    bf16 autocast     forward/backward of the 124M preset: loss and gradients against fp32
    fused AdamW       make_optimizer's (fused on a GPU) against torch's foreach AdamW
    FSDP2, world 1    bf16 parameters, fp32 reduction, against the plain model under autocast
    train.compile     compiled blocks against eager; compile time
    throughput        tokens/s and MFU: 124M at seq 1024, eager and compiled; llama-1b compiled
    generation        KV-cache decoding equal to recomputing the context; new tokens/s
    scoring           evaluation's replica (ScoreWindows) in bf16 against fp32; windows/s
    checkpoint        a sharded save from FSDP2, loaded into the plain model: equal weights

Where it runs: a GPU machine with torch (CUDA), safetensors, tokenizers, numpy, pyarrow and
pyyaml, from a plain source checkout (it puts the repository root on sys.path; raylm needs no
install). raylm's config also needs pydantic: where it is missing and nothing can be
downloaded, bring its wheels (pydantic, pydantic-core, annotated-types, typing-inspection,
typing-extensions) in .whl/ and `pip install --no-index --find-links .whl pydantic` first.

    python3 benchmarks/gpu_check.py            # one H100/H200; the budget is 8 minutes
    python3 benchmarks/gpu_check.py --smoke    # CPU, tiny sizes: the test suite runs it

The corpus is raylm's grammar (generated here, no download), under a BPE of 2,048 tokens; the
124M model keeps GPT-2's 50,304-entry vocabulary so that its FLOPs are GPT-2's.
"""

from __future__ import annotations

import argparse
import copy
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    import pydantic  # noqa: F401  (raylm.config's dependency; see the docstring)
except ModuleNotFoundError:
    sys.exit("gpu_check: raylm's config needs pydantic; bring its wheels (see this script's docstring)")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from raylm.config import ModelSection, TokenizerSection, TrainSection  # noqa: E402
from raylm.models import GPT, flops_per_token, param_counts  # noqa: E402
from raylm.models.config import ModelConfig, planned_model  # noqa: E402
from raylm.models.generate import generate, pick_next  # noqa: E402
from raylm.pipelines.data import grammar  # noqa: E402
from raylm.pipelines.data.arrays import as_fixed_list  # noqa: E402
from raylm.pipelines.data.loader import as_batch  # noqa: E402
from raylm.pipelines.data.tokenizer import eos_id, train_tokenizer  # noqa: E402
from raylm.pipelines.eval.evaluate import Replicas, ScoreWindows  # noqa: E402
from raylm.pipelines.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from raylm.pipelines.train.cost import detect_hardware  # noqa: E402
from raylm.pipelines.train.optim import make_optimizer  # noqa: E402
from raylm.pipelines.train.parallelize import checkpoint_activations, compile_blocks, parallelize  # noqa: E402
from raylm.pipelines.train.step import train_step  # noqa: E402
from raylm.storage import locate  # noqa: E402

# Model shapes and step counts: on a GPU, GPT-2 124M and Llama 3.2 1B's shape; --smoke, tiny
# ones that show the same checks run (their figures mean nothing).
FULL = {
    "small": dict(preset="124m", vocab_size=50304),
    "large": dict(preset="llama-1b", vocab_size=128256, block_size=2048),
    "micro": 16,  # windows of 1,024 per step: 16k tokens
    "large_micro": 4,  # windows of 2,048
    "steps": 5,  # compared steps
    "timed": 20,  # throughput steps after warm-up
    "docs": 20_000,
}
SMOKE = {
    "small": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=2048),
    "large": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, block_size=128, vocab_size=2048),
    "micro": 4,
    "large_micro": 2,
    "steps": 3,
    "timed": 3,
    "docs": 400,
}

# Tolerances, relative. bf16 keeps 8 bits of mantissa (3.9e-3 a rounding); a loss averages
# over a step's 16k tokens, so it moves far less than one rounding.
LOSS_RTOL = 1e-2  # bf16 against fp32, FSDP2's bf16 parameters against autocast, compiled against eager
OPTIM_RTOL = 1e-4  # the same arithmetic in fp32: fused and foreach AdamW apply the same update
GRAD_COSINE = 0.99  # bf16 gradients point where fp32 ones do


@dataclass
class Row:
    check: str
    figure: str
    ok: bool | None = None  # None: a figure, nothing to compare


class Windows:
    """The grammar corpus encoded once, cut into (B, seq + 1) windows, handed out in order;
    also a BatchSource for train_step (next_batch)."""

    def __init__(self, tokens: torch.Tensor, micro: int, seq: int):
        n = len(tokens) // (seq + 1)
        self.windows = tokens[: n * (seq + 1)].view(n, seq + 1)
        self.micro, self.at = micro, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(self.at, self.at + self.micro) % len(self.windows)
        self.at += self.micro
        return as_batch(self.windows[rows])

    def rewind(self) -> Windows:
        self.at = 0
        return self


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks that the script runs")
    args = p.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; --smoke runs the checks on CPU at tiny sizes")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references in fp32, not TF32
    print(f"[gpu_check] {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp, world_of_one(device):
        tokens, tokenizer = grammar_tokens(Path(tmp), sizes["docs"])
        small = model_config(sizes["small"])
        data = Windows(tokens, sizes["micro"], small.block_size)
        rows = precision_rows(small, data, device, sizes["steps"])
        rows += fsdp_rows(small, data, device, sizes["steps"])
        rows += compile_rows(small, data, device, sizes)
        large = model_config(sizes["large"])
        rows += [throughput_row(large, Windows(tokens, sizes["large_micro"], large.block_size), device, sizes)]
        rows += generation_rows(small, device)
        rows += checkpoint_rows(small, data, device, Path(tmp), tokenizer)
    rows.append(
        Row(
            "Ray, MLflow imported",
            str(sorted({"ray", "mlflow"} & set(sys.modules)) or "neither"),
            not {"ray", "mlflow"} & set(sys.modules),
        )
    )
    print_table(rows)
    return 0 if all(r.ok is not False for r in rows) else 1


def world_of_one(device: torch.device):
    """A one-process torch.distributed group (NCCL on a GPU, gloo on CPU), as a Ray Train
    worker of a world of 1 has: FSDP2 and DCP need one."""

    class Group:
        def __enter__(self):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            if device.type == "cuda":
                torch.cuda.set_device(0)

        def __exit__(self, *exc):
            dist.destroy_process_group()

    return Group()


def grammar_tokens(tmp: Path, docs: int):
    """The grammar's first `docs` documents under a BPE trained on them, joined with EOS."""
    texts = [grammar.generate_doc(0, i).text for i in range(docs)]
    tok = train_tokenizer(iter([texts]), TokenizerSection(vocab_size=2048), tmp / "tokenizer.json")
    eos = eos_id(tok)
    ids = [i for e in tok.encode_batch_fast(texts, add_special_tokens=False) for i in [*e.ids, eos]]
    return torch.tensor(ids, dtype=torch.long), tmp / "tokenizer.json"


def model_config(shape: dict) -> ModelConfig:
    return planned_model(ModelSection(**shape), shape["vocab_size"])


def built(config: ModelConfig, device: torch.device, strategy: str = "ddp") -> torch.nn.Module:
    """A model as raylm's workers build it: on meta, parallelized (a world of 1: the plain model
    under "ddp"), then each parameter drawn from seed 0 and its name, the same under either."""
    with torch.device("meta"):
        model = GPT(config)
    return parallelize(model, strategy, device, seed=0)


def bf16(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def steps(model, optimizer, data: Windows, device, n: int, precision) -> list[float]:
    losses = []
    for _ in range(n):
        x, y = (t.to(device) for t in data.next_batch())
        with precision:
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def precision_rows(config, data: Windows, device, n: int) -> list[Row]:
    """bf16 autocast against fp32 on one batch (loss, gradient direction); make_optimizer's
    AdamW (fused on a GPU) against foreach AdamW over n steps in fp32."""
    model = built(config, device)
    x, y = (t.to(device) for t in data.rewind().next_batch())
    grads, losses = [], []
    for precision in (torch.autocast(device.type, enabled=False), bf16(device)):
        with precision:
            _, loss = model(x, y)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters()]))
        losses.append(loss.item())
        model.zero_grad(set_to_none=True)
    cosine = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
    other = copy.deepcopy(model)
    train = TrainSection(lr=3e-4)
    fused = make_optimizer(model, train)
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]} for g in make_optimizer(other, train).param_groups
    ]
    foreach = torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), foreach=True)
    off = torch.autocast(device.type, enabled=False)
    a = steps(model, fused, data.rewind(), device, n, off)
    b = steps(other, foreach, data.rewind(), device, n, off)
    worst = max(rel(u, v) for u, v in zip(a, b))
    return [
        Row(
            "bf16 autocast loss",
            f"{losses[1]:.5f} vs fp32 {losses[0]:.5f}: rel {rel(losses[1], losses[0]):.1e}",
            rel(losses[1], losses[0]) < LOSS_RTOL,
        ),
        Row("bf16 gradients", f"cosine {cosine:.5f} to fp32's", cosine > GRAD_COSINE),
        Row(
            f"AdamW fused={fused.defaults['fused']}",
            f"{n} steps, losses {a[0]:.4f}->{a[-1]:.4f}; max rel {worst:.1e} from foreach",
            worst < OPTIM_RTOL,
        ),
    ]


def fsdp_rows(config, data: Windows, device, n: int) -> list[Row]:
    """FSDP2 on a world of 1 (on a GPU: bf16 parameters, fp32 gradient reduction) against the
    plain model under autocast, from the same drawn weights, over the same n steps."""
    losses = {}
    for strategy in ("ddp", "fsdp"):
        model = built(config, device, strategy)
        optimizer = make_optimizer(model, TrainSection(lr=3e-4))
        data.rewind()
        losses[strategy] = [float(train_step(model, optimizer, data, 1, 1.0, device)[0]) for _ in range(n)]
    worst = max(rel(u, v) for u, v in zip(losses["fsdp"], losses["ddp"]))
    what = "bf16 params, fp32 reduce" if device.type == "cuda" else "fp32"
    return [Row(f"FSDP2 world 1 ({what})", f"{n} steps, max rel {worst:.1e} from plain", worst < LOSS_RTOL)]


def compile_rows(config, data: Windows, device, sizes: dict) -> list[Row]:
    """Compiled blocks against eager from the same weights, then both timed."""
    eager = built(config, device)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    n, found = sizes["steps"], {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        optimizer = make_optimizer(model, TrainSection(lr=3e-4))
        data.rewind()
        started = time.perf_counter()
        first = float(train_step(model, optimizer, data, 1, 1.0, device)[0])
        first_s = time.perf_counter() - started
        rest = [float(train_step(model, optimizer, data, 1, 1.0, device)[0]) for _ in range(n - 1)]
        found[name] = ([first, *rest], first_s, timed_steps(model, optimizer, data, device, sizes["timed"]))
    worst = max(rel(u, v) for u, v in zip(found["compiled"][0], found["eager"][0]))
    compile_s = found["compiled"][1] - found["eager"][1]
    rows = [
        Row("train.compile", f"{n} steps, max rel {worst:.1e} from eager; compile {compile_s:.1f} s", worst < LOSS_RTOL)
    ]
    for name in ("eager", "compiled"):
        rows.append(Row(f"throughput {name_of(config)} {name}", mfu_text(config, data, device, found[name][2])))
    return rows


def timed_steps(model, optimizer, data: Windows, device, n: int) -> float:
    """Median seconds of n train steps after two warm-up steps."""
    seconds = []
    for i in range(n + 2):
        sync(device)
        started = time.perf_counter()
        train_step(model, optimizer, data, 1, 1.0, device)
        sync(device)
        if i >= 2:
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def name_of(config: ModelConfig) -> str:
    n = param_counts(config)["total"]
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def mfu_text(config: ModelConfig, data: Windows, device, step_s: float) -> str:
    tokens = data.micro * config.block_size
    per_s = tokens / step_s
    hw = detect_hardware(device.type == "cuda", 1, torch.get_num_threads(), None)
    mfu = flops_per_token(config, config.block_size) * per_s / (hw.peak_flops * hw.units)
    return f"{per_s:,.0f} tokens/s, MFU {mfu:.1%} of {hw.name} (seq {config.block_size}, batch {data.micro})"


def throughput_row(config, data: Windows, device, sizes: dict) -> Row:
    """The larger model compiled; activation checkpointing where its activations do not fit."""
    for checkpointed in (False, True):
        try:
            step_s = compiled_step_seconds(config, data.rewind(), device, sizes["timed"], checkpointed)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()  # the failed attempt's tensors went with its frames
            continue
        label = " + activation checkpointing" if checkpointed else ""
        return Row(f"throughput {name_of(config)} compiled{label}", mfu_text(config, data, device, step_s))
    return Row(f"throughput {name_of(config)}", "out of memory even with activation checkpointing", False)


def compiled_step_seconds(config, data: Windows, device, n: int, checkpointed: bool) -> float:
    model = built(config, device)
    if checkpointed:
        checkpoint_activations(model)
    compile_blocks(model)
    return timed_steps(model, make_optimizer(model, TrainSection(lr=3e-4)), data, device, n)


def generation_rows(config, device) -> list[Row]:
    """KV-cache greedy decoding equals recomputing the whole context (fp32), then its speed."""
    model = built(config, device).eval()
    prompts = [[(7 * i + j) % 500 + 1 for j in range(16)] for i in range(8)]
    new = min(64, config.block_size - 16)
    cached = generate(model, prompts[:1], new, temperature=0)[0]
    idx = torch.tensor(prompts[:1], device=device)
    with torch.no_grad():
        for _ in range(new):
            idx = torch.cat([idx, pick_next(model(idx)[0][:, -1], temperature=0)], dim=1)
    same = cached == idx[0, 16:].tolist()
    sync(device)
    started = time.perf_counter()
    with bf16(device):
        out = generate(model, prompts, new, temperature=0)
    sync(device)
    per_s = sum(map(len, out)) / (time.perf_counter() - started)
    return [
        Row(
            "KV-cache generation",
            f"{new} greedy tokens equal to recomputing: {same}; {per_s:,.0f} new tokens/s (8 prompts, bf16)",
            same,
        )
    ]


def checkpoint_rows(config, data: Windows, device, tmp: Path, tokenizer: Path) -> list[Row]:
    """FSDP2's sharded save, read back into the plain model (another layout: whole tensors),
    then scored by evaluation's replica in bf16 and fp32."""
    fsdp = built(config, device, "fsdp")
    optimizer = make_optimizer(fsdp, TrainSection(lr=3e-4))
    for _ in range(2):
        train_step(fsdp, optimizer, data, 1, 1.0, device)
    directory = tmp / "checkpoint_000002"
    started = time.perf_counter()
    save_checkpoint(directory, fsdp, optimizer, {"step": 2}, tokenizer)
    save_s = time.perf_counter() - started
    plain = built(config, device)
    started = time.perf_counter()
    state = load_checkpoint(directory, plain, make_optimizer(plain, TrainSection(lr=3e-4)))
    load_s = time.perf_counter() - started
    whole = dict(plain.named_parameters())
    equal = all(torch.equal(p.full_tensor(), whole[n]) for n, p in fsdp.named_parameters())
    rows = [
        Row(
            "sharded checkpoint",
            f"save {save_s:.1f} s, load into the plain model {load_s:.1f} s "
            f"({state['bytes_read'] / 2**20:,.0f} MB read); weights equal: {equal}",
            equal,
        )
    ]
    return rows + scoring_rows(directory, data, device)


def scoring_rows(directory: Path, data: Windows, device) -> list[Row]:
    """Evaluation's replica (pipelines/eval/evaluate.py ScoreWindows) on 64 windows, in fp32
    and under bf16 autocast: the same losses within LOSS_RTOL, and windows/s of each."""
    import pyarrow as pa

    windows = data.windows[:64].numpy().astype("int32")
    batch = pa.table({"tokens": as_fixed_list(windows)})
    found = {}
    for precision in (False, True):
        replicas = Replicas(gpus=1.0 if device.type == "cuda" else 0.0, threads=torch.get_num_threads(), bf16=precision)
        replica = ScoreWindows(locate(directory), replicas)
        replica(batch)  # warm-up
        sync(device)
        started = time.perf_counter()
        scores = replica(batch)
        sync(device)
        found[precision] = (
            scores["nats"].sum() / scores["tokens"].sum(),
            len(windows) / (time.perf_counter() - started),
        )
    off = rel(found[True][0], found[False][0])
    return [
        Row(
            "bf16 scoring replica",
            f"loss {found[True][0]:.5f} vs fp32 {found[False][0]:.5f}: rel {off:.1e}; "
            f"{found[True][1]:,.0f} vs {found[False][1]:,.0f} windows/s",
            off < LOSS_RTOL,
        )
    ]


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    print(f"\n| {'check':<{width}} | result | figures |\n|{'-' * (width + 2)}|--------|---------|")
    for r in rows:
        verdict = "" if r.ok is None else ("ok" if r.ok else "FAIL")
        print(f"| {r.check:<{width}} | {verdict:<6} | {r.figure} |")
    failed = [r.check for r in rows if r.ok is False]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")


if __name__ == "__main__":
    sys.exit(main())
