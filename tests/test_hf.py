"""Hugging Face interop against real `transformers`: export, import, round trip."""

import json

import pytest
import torch

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


def test_import_refuses_rope_scaling(tmp_path):
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
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
            }
        )
    )
    with pytest.raises(NotConvertible, match="rope"):
        import_hf(tmp_path / "hf", tmp_path / "raylm")
