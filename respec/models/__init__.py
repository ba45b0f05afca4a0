"""Model core: config, decoder, KV cache, HF-format checkpoints and tokenizer."""

from .cache import KVCache
from .checkpoint import CheckpointError, Pretrained, load_pretrained, parse_dtype, save_pretrained
from .config import PRESETS, ConfigError, ModelConfig, RopeConfig
from .tokenizer import Tokenizer, TokenizerError
from .transformer import ModelOutput, Transformer

__all__ = [
    "KVCache", "CheckpointError", "Pretrained", "load_pretrained", "parse_dtype", "save_pretrained",
    "PRESETS", "ConfigError", "ModelConfig", "RopeConfig", "Tokenizer", "TokenizerError",
    "ModelOutput", "Transformer",
]
