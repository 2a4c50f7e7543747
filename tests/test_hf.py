"""Hugging Face interop against real `transformers`: export, import, round trip."""

import json

import pytest
import torch

from raylm.config import RopeScaling
from raylm.models import GPT, ModelConfig, load_model, save_model
from raylm.models.hf import NotConvertible, export_hf, import_hf

transformers = pytest.importorskip("transformers")


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(
        **{
            "vocab_size": 97,
            "n_layer": 2,
            "n_head": 4,
            "n_kv_head": 2,
            "n_embd": 32,
            "block_size": 32,
            "rope_theta": 5000.0,
            **overrides,
        }
    )


def saved(tmp_path, cfg: ModelConfig):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    save_model(model, tmp_path / "raylm")
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_exported_model_gives_the_same_logits_in_transformers(tmp_path, tie):
    model = saved(tmp_path, tiny(tie_embeddings=tie))
    export_hf(tmp_path / "raylm", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, model(idx)[0], atol=1e-4)


def test_export_refuses_what_llama_cannot_express(tmp_path):
    saved(tmp_path, tiny(qk_norm=True))
    with pytest.raises(NotConvertible, match="qk_norm"):
        export_hf(tmp_path / "raylm", tmp_path / "hf")


def test_imported_hf_llama_gives_the_same_logits(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=40,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf", tmp_path / "raylm").eval()
    assert (model.config.n_kv_head, model.config.ffn_width(), model.config.norm_eps) == (2, 100, 1e-6)
    idx = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "raylm")(idx)[0], hf(idx).logits, atol=1e-4)


def test_export_then_import_is_the_identity(tmp_path):
    model = saved(tmp_path, tiny())
    export_hf(tmp_path / "raylm", tmp_path / "hf")
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    # The import spells out the FFN width that the default rule gave the original.
    assert back.config.ffn_hidden == model.config.ffn_width()
    assert {**back.config.to_dict(), "ffn_hidden": None} == model.config.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_import_never_unpickles(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 8,
            }
        )
    )
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(NotConvertible, match="never unpickles"):
        import_hf(tmp_path / "hf", tmp_path / "raylm")


# Llama 3.1's published scaling, but over a 32-token pretraining context so that a 48-token
# model with rope_theta 100 and head_dim 8 has a frequency in each band: wavelengths 6.3 (under
# 32/4: kept), 19.9 (between: blended), 63 and 199 (over 32/1: divided by 8).
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def llama3_checkpoint(tmp_path, spelling: str):
    """A random LlamaForCausalLM with llama3 rope scaling, saved with its config.json in the
    spelling transformers 5 writes (rope_parameters) or the one on the Hub (rope_scaling)."""
    cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=48,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        # 10x the default init: sharper attention, so positions (and their RoPE) move the logits.
        initializer_range=0.2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 100.0, **LLAMA3},
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    if spelling == "rope_scaling":  # as Meta's Llama 3.1/3.2 config.json have it
        path = tmp_path / "hf" / "config.json"
        c = json.loads(path.read_text())
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        path.write_text(json.dumps({**c, "rope_scaling": rope}))
    return hf


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_imported_llama3_rope_scaling_gives_the_same_logits(tmp_path, spelling):
    hf = llama3_checkpoint(tmp_path, spelling)
    import_hf(tmp_path / "hf", tmp_path / "raylm")
    model = load_model(tmp_path / "raylm").eval()  # through model.json, as every loader reads it
    assert model.config.rope_scaling == RopeScaling(**LLAMA3) and model.config.rope_theta == 100.0
    idx = torch.randint(0, 101, (2, 48), generator=torch.Generator().manual_seed(1))  # past the 32 pretrained
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(hf.model.embed_tokens(idx), torch.arange(48)[None])
        assert torch.allclose(cos[0], model.rope_cos, atol=1e-6) and torch.allclose(sin[0], model.rope_sin, atol=1e-6)
        assert torch.allclose(model(idx)[0], hf(idx).logits, atol=1e-4)


def test_llama3_rope_scaling_changes_the_logits(tmp_path):
    """The same weights with plain RoPE give other logits, so the test above cannot pass by
    ignoring the scaling."""
    llama3_checkpoint(tmp_path, "rope_parameters")
    scaled = import_hf(tmp_path / "hf", tmp_path / "raylm").eval()
    plain = GPT(scaled.config.model_copy(update={"rope_scaling": None})).eval()
    plain.load_state_dict(scaled.state_dict())
    idx = torch.randint(0, 101, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (scaled(idx)[0] - plain(idx)[0]).abs().max() > 1.0  # 10,000x the tolerance above


def test_llama3_rope_scaling_survives_export_and_import(tmp_path):
    model = saved(tmp_path, tiny(rope_theta=100.0, block_size=48, rope_scaling=LLAMA3))
    export_hf(tmp_path / "raylm", tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["rope_scaling"] == {"rope_type": "llama3", **LLAMA3}  # transformers < 5
    assert written["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 100.0, **LLAMA3}  # >= 5
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cos, _ = hf.model.rotary_emb(hf.model.embed_tokens(idx), torch.arange(48)[None])
        assert torch.allclose(cos[0], model.rope_cos, atol=1e-6)  # HF computed the scaled frequencies too
        assert torch.allclose(hf(idx).logits, model(idx)[0], atol=1e-4)
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    assert {**back.config.to_dict(), "ffn_hidden": None} == model.config.to_dict()


def hf_config(tmp_path, **rope) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 8,
                **rope,
            }
        )
    )


@pytest.mark.parametrize(
    "rope, expected",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'.*'llama3'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'.*'llama3'"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters.rope_type='dynamic'"),
        (
            {"rope_scaling": {"rope_type": "llama3", **LLAMA3, "high_freq_factor": 1.0}},
            "rope_scaling: high_freq_factor=1.0 must exceed low_freq_factor=1.0",
        ),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling: low_freq_factor: Field required"),
    ],
)
def test_import_refuses_other_rope_scaling(tmp_path, rope, expected):
    """Any scaling raylm does not compute is refused, naming the key, not silently dropped."""
    hf_config(tmp_path, **rope)
    with pytest.raises(NotConvertible, match=expected):
        import_hf(tmp_path / "hf", tmp_path / "raylm")
