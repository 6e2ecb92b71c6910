"""Pure nn.Modules for masked diffusion LMs and their checkpoint loading."""

from .config import PRESETS, ModelConfig
from .loading import (CheckpointError, DEFAULT_MODEL_DIR, load_config, load_model, load_tokenizer, read_json,
                      resolve_checkpoint_dir, save_model)
from .quantize import QUANTIZE_MODES, check_quantize, quantize_model, weight_bytes
from .transformer import KVCache, MaskedDiffusionLM, MaskedLMOutput

__all__ = [
    "PRESETS", "ModelConfig", "CheckpointError", "DEFAULT_MODEL_DIR", "load_config", "load_model",
    "load_tokenizer", "read_json", "resolve_checkpoint_dir", "save_model", "KVCache", "MaskedDiffusionLM",
    "MaskedLMOutput", "QUANTIZE_MODES", "check_quantize", "quantize_model", "weight_bytes",
]
