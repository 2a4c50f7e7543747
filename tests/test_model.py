import pytest
import torch

from raylm.config import ModelSection, RopeScaling
from raylm.models import GPT, PRESETS, ModelConfig, flops_per_token, load_model, param_counts, save_model
from raylm.models.config import planned_model
from raylm.models.generate import generate, pick_next
from raylm.models.gpt import KVCache, llama3_inv_freq


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
    a = generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=0)
    b = generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=0)
    assert a == b and len(a[0]) == 13  # block_size 16 leaves room for 13 new tokens
    stop = a[0][-1]
    stopped = generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=0, stop_tokens=(stop,))
    assert stopped == [a[0][: a[0].index(stop)]]  # everything before the first stop token


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 1}, {"qk_norm": True}])
def test_kv_cache_logits_equal_full_forward(overrides):
    torch.manual_seed(0)
    model = GPT(tiny(**overrides)).eval()
    idx = torch.randint(0, 97, (2, 16))
    cache = KVCache(model.config, 2, 16)
    with torch.no_grad():
        full, _ = model(idx)
        steps = [
            model(idx[:, :5], cache=cache)[0],  # prefill
            model(idx[:, 5:9], cache=cache)[0],
        ]  # a chunk after cached tokens
        steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(9, 16)]  # one token at a time
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_left_padded_batch_decodes_like_each_prompt_alone():
    torch.manual_seed(0)
    model = GPT(tiny(n_kv_head=2))
    prompts = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14]]
    batch = generate(model, prompts, max_new_tokens=8, temperature=0)
    assert batch == [generate(model, [p], max_new_tokens=8, temperature=0)[0] for p in prompts]


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    model = GPT(tiny())
    greedy = generate(model, [[1, 2]], 10, temperature=0)
    gen = torch.Generator().manual_seed(0)
    assert generate(model, [[1, 2]], 10, temperature=1.0, top_k=1, generator=gen) == greedy
    assert generate(model, [[1, 2]], 10, temperature=1.0, top_p=1e-6, generator=gen) == greedy


def test_top_p_keeps_the_smallest_set_over_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {int(pick_next(logits, 1.0, top_p=0.7, generator=gen)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: tokens 2 and 3 never come


def test_prompt_filling_the_context_is_refused():
    with pytest.raises(ValueError, match="no room"):
        generate(GPT(tiny()), [list(range(16))], 5)


# -- presets and accounting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides", [{}, {"n_kv_head": 2}, {"tie_embeddings": False}, {"qk_norm": True}, {"ffn_hidden": 100}]
)
def test_parameter_counts_without_torch_match_the_module(overrides):
    cfg = tiny(**overrides)
    model = GPT(cfg)
    assert param_counts(cfg) == {"total": model.num_params(), "non_embedding": model.num_params(non_embedding=True)}


@pytest.mark.parametrize(
    "preset, vocab, published",
    [
        ("llama-7b", 32000, 6_738_415_616),  # Llama 2 7B
        ("llama-3b", 128256, 3_212_749_824),  # Llama 3.2 3B
        ("llama-1b", 128256, 1_235_814_400),  # Llama 3.2 1B
    ],
)
def test_llama_presets_have_the_published_parameter_counts(preset, vocab, published):
    assert param_counts(ModelConfig(vocab_size=vocab, **PRESETS[preset]))["total"] == published


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_a_valid_shape(preset):
    cfg = ModelConfig(vocab_size=50304, **PRESETS[preset])
    assert cfg.n_head % cfg.n_kv_head == 0 and cfg.head_dim % 2 == 0
    if preset == "tiny":
        assert GPT(cfg).num_params() == param_counts(cfg)["total"]


def test_config_section_and_model_share_one_shape():
    """raylm.config.ModelShape holds the fields and checks; the model section adds the preset,
    ModelConfig the RMSNorm epsilon. Every field a config sets reaches the model it trains."""
    assert set(ModelSection.model_fields) ^ set(ModelConfig.model_fields) == {"preset", "norm_eps"}
    section = ModelSection(preset="llama-1b", n_layer=3, dropout=0.1, qk_norm=True, vocab_size=1000)
    model = planned_model(section, tokenizer_vocab=50)
    assert model.to_dict() == {**section.model_dump(exclude={"preset"}), "norm_eps": 1e-5}
    assert ModelConfig(**model.to_dict()) == model  # model.json reads back as the same model


def test_flops_per_token_by_hand():
    cfg = tiny(n_kv_head=2)  # d=32, L=2, 4 heads of 8, kv width 16, ffn 128, V=97
    matmuls = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 128) + 97 * 32  # blocks + output head
    norms = 2 * 2 * 32 + 32  # counted in N as in 6N
    assert flops_per_token(cfg, seq_len=16) == 6 * (matmuls + norms) + 12 * 2 * 4 * 8 * 16


def test_llama3_rope_scaling_keeps_high_divides_low_and_blends_between():
    """head_dim 8, rope_theta 100: wavelengths 2*pi*100^(i/4) = 6.3, 19.9, 63, 199 tokens against
    the bands of a 32-token pretraining context, 32/4 = 8 and 32/1 = 32."""
    inv_freq = 1.0 / 100.0 ** (torch.arange(0, 8, 2).float() / 8)
    scaling = RopeScaling(factor=8, low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=32)
    # 19.9 turns 32/19.9 = 1.61 times: keep (1.61 - 1)/(4 - 1) = 0.2035 of the frequency, scale the rest.
    blended = 0.7965 * 0.31623 / 8 + 0.2035 * 0.31623
    expected = torch.tensor([1.0, blended, 0.1 / 8, 0.031623 / 8])
    scaled_freq = llama3_inv_freq(inv_freq, scaling)
    assert torch.allclose(scaled_freq, expected, rtol=1e-4)
    tables = GPT(tiny(rope_theta=100.0, block_size=48, rope_scaling=scaling)).rope_cos
    assert torch.allclose(tables[47, :4], torch.cos(47 * scaled_freq), atol=1e-5)  # the model's tables use them
