"""minipaligemma: a readable from-scratch PyTorch reimplementation of PaliGemma and PaliGemma 2."""

from .checkpoint import convert, load
from .config import PRESETS, PaliGemmaConfig, TextConfig, VisionConfig, get_config
from .gemma import Gemma, KVCache
from .paligemma import PaliGemma, make_attn_mask, prefix_lm_loss
from .siglip import SigLIPEncoder

__all__ = ["load", "convert", "PRESETS", "PaliGemmaConfig", "TextConfig", "VisionConfig", "get_config", "Gemma", "KVCache",
           "PaliGemma", "make_attn_mask", "prefix_lm_loss", "SigLIPEncoder"]
