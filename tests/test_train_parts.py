"""The training loop's parts without Ray: schedules, batch in tokens, optimizer groups,
activation checkpointing."""

import math

import pytest
import torch

from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.models import GPT, ModelConfig
from raylm.pipelines.train.optim import lr_at, make_optimizer
from raylm.pipelines.train.parallelize import checkpoint_activations, compile_blocks


def train(*overrides):
    return load_config(
        None, ["train.max_steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1", *overrides]
    ).train


def test_cosine_schedule():
    cfg = train()
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # halfway through the decay: the mean of 1 and 0.1
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_warmup_stable_decay_schedule():
    cfg = train("train.schedule=wsd", "train.decay_fraction=0.2")
    assert [lr_at(s, cfg) for s in (10, 50, 80)] == [1.0, 1.0, 1.0]  # stable until the last 20 steps
    assert lr_at(90, cfg) == pytest.approx(0.55) and lr_at(100, cfg) == pytest.approx(0.1)


def test_batch_in_tokens():
    cfg = load_config(None, ["train.batch_tokens=4096", "data.seq_len=128", "train.micro_batch_size=8"])
    assert cfg.train.batch_size == 32
    with pytest.raises(ConfigError, match="multiple of data.seq_len=128"):
        load_config(None, ["train.batch_tokens=4000", "data.seq_len=128"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["train.batch_tokens=4096", "train.batch_size=32", "data.seq_len=128"])
    with pytest.raises(ConfigError, match=r"batch_size=40 must be a multiple of .* = 16"):
        load_config(None, ["train.batch_tokens=5120", "data.seq_len=128", "train.micro_batch_size=8"])


def test_weight_decay_skips_norm_gains():
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8))
    decay, no_decay = make_optimizer(model, train()).param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0


def test_activation_checkpointing_and_compile_give_the_same_gradients():
    """Both are applied to the plain model from outside; neither may change the math or the
    parameter names that checkpoints use. (Compiling costs ~15 s with a cold inductor cache.)"""
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8)
    idx = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for apply in (None, checkpoint_activations, compile_blocks):
        torch.manual_seed(0)
        model = GPT(cfg)
        if apply:
            apply(model)
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert list(model.state_dict()) == list(GPT(cfg).state_dict())
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        assert all(torch.allclose(grads[0][n], other[n], atol=1e-6) for n in grads[0])


def test_checkpoint_commit_marks_whole_directories(tmp_path):
    from raylm.pipelines.train.checkpoint import latest_checkpoint, save_checkpoint, torn_reason, usable_checkpoint

    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8))
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    for step in (10, 20, 30):
        save_checkpoint(
            tmp_path / f"checkpoint_{step:06d}", model, make_optimizer(model, train()), {"step": step}, tokenizer
        )
    assert torn_reason(tmp_path / "checkpoint_000030") is None
    (tmp_path / "checkpoint_000030" / "COMMIT.json").unlink()  # died before the marker
    shard = tmp_path / "checkpoint_000020" / "state" / "shard-00001-model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])  # one byte short
    assert torn_reason(tmp_path / "checkpoint_000030") == "no COMMIT.json"
    assert "state/shard-00001-model-00002-of-00002.safetensors has" in torn_reason(tmp_path / "checkpoint_000020")
    assert usable_checkpoint(tmp_path / "checkpoint_000030").local == tmp_path / "checkpoint_000010"
    assert latest_checkpoint(tmp_path).local == tmp_path / "checkpoint_000010"


# -- one optimizer step: accumulation, clipping, non-finite gradients -------------------------


class Batches:
    """A BatchSource over fixed (inputs, targets) pairs, in order."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def next_batch(self):
        return next(self.batches)


def tiny_step_model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8))


def windows(n: int, seed: int = 0):
    idx = torch.randint(0, 50, (n, 9), generator=torch.Generator().manual_seed(seed))
    return idx[:, :-1], idx[:, 1:]


def update_of(model, batches, accum: int, grad_clip: float):
    """train_step with plain SGD at lr 1, so each parameter's change is minus its (clipped) gradient."""
    from raylm.pipelines.train.step import train_step

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss, grad_norm, _ = train_step(model, optimizer, Batches(batches), accum, grad_clip, torch.device("cpu"))
    delta = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    return float(loss), grad_norm, delta


def test_accumulating_k_micro_batches_equals_one_batch_k_times_the_size():
    x, y = windows(8)
    micro = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    loss_accum, norm_accum, accumulated = update_of(tiny_step_model(), micro, accum=4, grad_clip=0)
    loss_whole, norm_whole, whole = update_of(tiny_step_model(), [(x, y)], accum=1, grad_clip=0)
    assert loss_accum == pytest.approx(loss_whole, rel=1e-5) and norm_accum == pytest.approx(norm_whole, rel=1e-5)
    assert all(torch.allclose(accumulated[n], whole[n], rtol=1e-5, atol=1e-7) for n in whole)


def test_gradient_clipping_scales_the_update_to_grad_clip():
    x, y = windows(4)
    _, norm, free = update_of(tiny_step_model(), [(x, y)], accum=1, grad_clip=0)
    _, clipped_norm, clipped = update_of(tiny_step_model(), [(x, y)], accum=1, grad_clip=0.1)
    assert norm == pytest.approx(clipped_norm) and norm > 0.1  # the norm reported is before clipping
    update_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in clipped.values()]))
    assert float(update_norm) == pytest.approx(0.1, rel=1e-4)
    assert all(torch.allclose(clipped[n], free[n] * 0.1 / norm, rtol=1e-4, atol=1e-7) for n in free)  # direction kept


def test_a_non_finite_gradient_with_a_finite_loss_is_never_applied():
    model = tiny_step_model()
    model.lm_head.weight.register_hook(lambda g: g * float("inf"))  # one overflow, as in a bf16 spike
    loss, grad_norm, delta = update_of(model, [windows(2)], accum=1, grad_clip=1.0)
    assert math.isfinite(loss) and not math.isfinite(grad_norm)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in delta.values())  # no parameter moved
    assert all(p.grad is None for p in model.parameters())  # and nothing carries into the next step


def test_non_finite_steps_fail_or_are_skipped_as_configured():
    from raylm.pipelines.train.loop import check_step

    fail, skip = train(), train("train.on_nonfinite=skip", "train.max_skipped_steps=3")
    assert check_step(7, 2.5, 0.8, fail, 0) is False
    with pytest.raises(FloatingPointError, match=r"gradient norm is inf at step 7 \(loss 2.5\): the step was not"):
        check_step(7, 2.5, float("inf"), fail, 0)
    assert check_step(7, 2.5, float("nan"), skip, 0) is True and check_step(8, 2.5, float("nan"), skip, 1) is True
    with pytest.raises(FloatingPointError, match=r"3 steps in a row \(train.max_skipped_steps\)"):
        check_step(9, 2.5, float("nan"), skip, 2)
    with pytest.raises(FloatingPointError, match="loss is nan at step 7"):
        check_step(7, float("nan"), 0.8, skip, 0)
