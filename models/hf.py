"""Hugging Face interop: a raylm model directory <-> a `LlamaForCausalLM` directory.

raylm's block is Llama's (RoPE in the rotate-half layout HF uses, RMSNorm, SwiGLU, GQA), so
conversion renames tensors and translates the config; no weight is permuted. Files only:
this module does not need `transformers`, and it reads weights from safetensors only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from pydantic import ValidationError

from raylm.config import RopeScaling
from raylm.models.config import ModelConfig
from raylm.models.gpt import GPT
from raylm.models.io import check_weights, load_config, read_safetensors, save_model
from raylm.models.stream import save_streaming
from raylm.storage import Location, locate

TOP = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
TOP_FROM_HF, LAYER_FROM_HF = {v: k for k, v in TOP.items()}, {v: k for k, v in LAYER.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle files an HF directory may hold


class NotConvertible(ValueError):
    """The model uses something the other side cannot express."""


def hf_name(name: str) -> str:
    if name.startswith("blocks."):
        _, layer, rest = name.split(".", 2)  # blocks.<i>.<rest>
        return f"model.layers.{layer}.{LAYER[rest]}"
    return TOP[name]


def raylm_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)  # model.layers.<i>.<rest>
        return f"blocks.{layer}.{LAYER_FROM_HF[rest]}"
    return TOP_FROM_HF[name]


# -- export ---------------------------------------------------------------------------------


def export_hf(model_dir: str | Path | Location, out_dir: str | Path) -> Path:
    """Write `out_dir` so that `AutoModelForCausalLM.from_pretrained(out_dir)` is this model
    (and, if the directory has `tokenizer.json`, `AutoTokenizer` its tokenizer). `model_dir`
    may be on object storage: its weights are read by byte ranges, a block at a time."""
    config, out = load_config(model_dir), Path(out_dir)
    if config.qk_norm:
        raise NotConvertible("model.qk_norm has no equivalent in LlamaForCausalLM; export refused")
    check_weights(model_dir, "export")

    def rename(name: str) -> str:  # a tied embedding is stored as the head; HF stores it as the embedding
        return TOP["tok_emb.weight"] if config.tie_embeddings and name == "lm_head.weight" else hf_name(name)

    out.mkdir(parents=True, exist_ok=True)
    save_streaming(model_dir, out / "model.safetensors", rename, metadata={"format": "pt"})  # a block at a time
    eos = _copy_tokenizer(locate(model_dir), out, config)
    (out / "config.json").write_text(json.dumps(llama_config(config, eos), indent=2) + "\n")
    return out


def llama_config(config: ModelConfig, eos: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_width(),
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        **rope_fields(config),
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


def rope_fields(config: ModelConfig) -> dict:
    """RoPE in both spellings: transformers < 5 reads rope_theta plus rope_scaling (the scaling
    alone, no theta), >= 5 rope_parameters (theta and scaling together). Both carry the same
    values, so it does not matter that 5.x lets a rope_scaling present override rope_parameters."""
    scaling = config.rope_scaling.model_dump() if config.rope_scaling else None
    fields = {
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta, **(scaling or {})},
    }
    return {**fields, "rope_scaling": scaling} if scaling else fields


def _copy_tokenizer(model_dir: Location, out: Path, config: ModelConfig) -> int | None:
    """tokenizer.json plus the small config AutoTokenizer needs; returns the EOS id (the
    first special token, raylm's end-of-document marker)."""
    if not (model_dir / "tokenizer.json").is_file():
        return None
    text = (model_dir / "tokenizer.json").read_text()
    (out / "tokenizer.json").write_text(text)
    added = json.loads(text).get("added_tokens", [])
    special = [t for t in added if t.get("special")]
    if not special:
        return None
    eos = special[0]
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": eos["content"],
                "bos_token": eos["content"],
                "model_max_length": config.block_size,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eos["id"], "eos_token_id": eos["id"]}) + "\n"
    )
    return eos["id"]


# -- import ---------------------------------------------------------------------------------


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> GPT:
    """A Llama-architecture HF checkpoint (safetensors, one file or sharded) as a raylm model
    directory in float32, ready to fine-tune; its tokenizer.json comes along."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    config = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    state = {raylm_name(k): v.float() for k, v in _read_weights(hf_dir).items() if "rotary_emb" not in k}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model = GPT(config)
    model.load_state_dict(state, strict=True)
    save_model(model, out)
    if (hf_dir / "tokenizer.json").is_file():
        shutil.copyfile(hf_dir / "tokenizer.json", out / "tokenizer.json")
    return model


def model_config_from_hf(c: dict) -> ModelConfig:
    checks = {
        "model_type": (c.get("model_type") == "llama", "only Llama-architecture checkpoints"),
        "hidden_act": (c.get("hidden_act", "silu") == "silu", "SwiGLU with SiLU only"),
        "attention_bias": (not c.get("attention_bias"), "no attention biases"),
        "mlp_bias": (not c.get("mlp_bias"), "no MLP biases"),
        "head_dim": (
            c.get("head_dim") in (None, c["hidden_size"] // c["num_attention_heads"]),
            "head_dim = hidden_size / num_attention_heads",
        ),
    }
    for key, (ok, what) in checks.items():
        if not ok:
            raise NotConvertible(f"config.json {key}: raylm imports {what}")
    rope_theta, rope_scaling = rope_from_hf(c)
    return ModelConfig(
        vocab_size=c["vocab_size"],
        n_layer=c["num_hidden_layers"],
        n_head=c["num_attention_heads"],
        n_kv_head=c.get("num_key_value_heads"),
        n_embd=c["hidden_size"],
        block_size=c["max_position_embeddings"],
        ffn_hidden=c["intermediate_size"],
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=c.get("rms_norm_eps", 1e-6),
    )


def rope_from_hf(c: dict) -> tuple[float, RopeScaling | None]:
    """rope_theta and the llama3 scaling, if any, from either spelling (see rope_fields). Like
    transformers 5, a rope_scaling present wins over rope_parameters; any other rope type is
    refused, since raylm would compute different frequencies than the checkpoint was trained with."""
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    rope = c.get(key) or {}
    theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))  # "type": the older spelling
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise NotConvertible(
            f"config.json {key}.rope_type={kind!r}: raylm imports plain RoPE or rope_type 'llama3' only"
        )
    fields = {k: rope[k] for k in RopeScaling.model_fields if k in rope and k != "rope_type"}
    # transformers' fallback when a llama3 config omits it: the model's own context length.
    fields.setdefault("original_max_position_embeddings", c["max_position_embeddings"])
    try:
        return theta, RopeScaling(**fields)
    except ValidationError as err:
        raise NotConvertible(f"config.json {key}: " + "; ".join(map(_problem, err.errors()))) from None


def _problem(e: dict) -> str:
    msg = e["msg"].removeprefix("Value error, ")  # a cross-field check names its keys itself
    return f"{'.'.join(map(str, e['loc']))}: {msg} (got {e['input']!r})" if e["loc"] else msg


def _read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    if not (hf_dir / files[0]).is_file():
        pickles = (
            ", ".join(p.name for p in sorted(hf_dir.iterdir()) if p.suffix in PICKLE_SUFFIXES) or "pytorch_model.bin"
        )
        raise NotConvertible(f"{hf_dir}: no model.safetensors; raylm never unpickles {pickles}")
    return {k: v for f in files for k, v in read_safetensors(hf_dir / f).items()}
