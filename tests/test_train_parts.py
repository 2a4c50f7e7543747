"""The training loop's parts without Ray: schedules, batch in tokens, optimizer groups,
activation checkpointing."""

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
    state = tmp_path / "checkpoint_000020" / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:-1])  # one byte short
    assert torn_reason(tmp_path / "checkpoint_000030") == "no COMMIT.json"
    assert "train_state.safetensors has" in torn_reason(tmp_path / "checkpoint_000020")
    assert usable_checkpoint(tmp_path / "checkpoint_000030") == tmp_path / "checkpoint_000010"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_000010"
