import pytest
import torch

from raylm.models import GPT, ModelConfig, load_model, save_model
from raylm.models.generate import generate


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 97, "n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, **overrides})


def test_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx, targets = torch.randint(0, 97, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 97)
    # An untrained model is close to uniform: loss near ln(97) = 4.57.
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.2


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_causality_future_tokens_never_change_past_logits(n_kv_head):
    torch.manual_seed(0)
    model = GPT(tiny(n_kv_head=n_kv_head)).eval()
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 97  # alter every token from position 9 on
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_config_validation():
    with pytest.raises(ValueError, match="n_embd"):
        tiny(n_embd=30)
    with pytest.raises(ValueError, match="n_kv_head"):
        tiny(n_kv_head=3)
    with pytest.raises(ValueError, match="even"):
        ModelConfig(vocab_size=10, n_head=4, n_embd=36)  # head dim 9


def test_parameter_count_by_hand():
    cfg = tiny(n_kv_head=2)  # d=32, head dim 8, kv width 16, ffn 2/3*4*32=85 -> 128
    assert cfg.ffn_width() == 128
    per_block = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 128 + 2 * 32  # q, k+v, o, SwiGLU, 2 norms
    expected = 97 * 32 + 2 * per_block + 32  # tied embedding, blocks, final norm
    model = GPT(cfg)
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - 97 * 32
    untied = GPT(tiny(n_kv_head=2, tie_embeddings=False))
    assert untied.num_params() == expected + 97 * 32


def test_save_and_load_give_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path).eval()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # tying survives the round trip


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_greedy_generation_is_deterministic_and_stops():
    torch.manual_seed(0)
    model = GPT(tiny())
    prompt = torch.tensor([[1, 2, 3]])
    a = generate(model, prompt, max_new_tokens=20, temperature=0)
    b = generate(model, prompt, max_new_tokens=20, temperature=0)
    assert torch.equal(a, b) and a.shape == (1, 23)
    first = int(a[0, 3])
    stopped = generate(model, prompt, max_new_tokens=20, temperature=0, stop_token=first)
    assert stopped.shape == (1, 4)
