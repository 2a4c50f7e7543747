"""Model family: plain single-device PyTorch. Imports torch and safetensors only, never Ray."""

from .gpt import GPT, ModelConfig
from .io import load_model, save_model

__all__ = ["GPT", "ModelConfig", "load_model", "save_model"]
