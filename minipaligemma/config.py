"""Configurations of the PaliGemma family, as frozen dataclasses with named presets.

A PaliGemma model is two towers joined by one linear layer:

    VisionConfig   the SigLIP So400m/14 image encoder (the same in PaliGemma 1 and 2)
    TextConfig     the Gemma decoder: Gemma 1 2B (PaliGemma 1) or Gemma 2 2B/9B/27B (PaliGemma 2)
    PaliGemmaConfig  both, plus nothing else: the projector's shape follows from the two widths.

Every number below comes from big_vision's configs and the official checkpoints; docs/architecture.md
§2-§6 lists them with their sources. `get_config(name)` returns a preset; `dataclasses.replace` derives variants, e.g.
`replace(cfg, vision=replace(cfg.vision, image_size=448))`.

Two choices that differ between implementations are explicit fields here:
- `TextConfig.final_softcap`: Gemma 2 caps the output logits at 30 (`30 * tanh(z / 30)`). The
  PaliGemma 2 paper keeps the cap on in pretraining and turns it off for transfer, so the
  trainer sets it to None for stage 3.
- `TextConfig.sliding_window`: Gemma 2's local layers look back 4096 positions in transformers,
  but big_vision (which trained PaliGemma 2) has no window. Off (None) by default; 4096
  reproduces transformers.
"""

from dataclasses import dataclass, field

from .files import BadInput


OFFICIAL_BV_VOCAB = 257152  # 256000 Gemma pieces + 1024 <loc> + 128 <seg>: big_vision's embedding rows


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT: patch embedding, learned positions, pre-LN blocks, final LayerNorm."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    norm_eps: float = 1e-6

    @property
    def grid_size(self) -> int:
        """Patches per side: 224 // 14 = 16."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Image tokens per image: 256 at 224 px, 1024 at 448 px, 4096 at 896 px."""
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")


ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flex")  # gemma.py explains each


@dataclass(frozen=True)
class TextConfig:
    """Gemma decoder. `version` 1 is Gemma (PaliGemma 1), 2 is Gemma 2 (PaliGemma 2)."""

    version: int = 2
    vocab_size: int = OFFICIAL_BV_VOCAB
    width: int = 2304
    depth: int = 26
    mlp_dim: int = 9216
    num_heads: int = 8  # N query heads
    num_kv_heads: int = 4  # K key/value heads; N // K query heads share one
    head_dim: int = 256
    query_pre_attn_scalar: int = 256  # queries are scaled by its inverse square root
    rope_base: float = 10_000.0
    max_positions: int = 8192  # context length, image + text tokens (transformers: max_position_embeddings)
    norm_eps: float = 1e-6
    attn_softcap: float | None = 50.0  # Gemma 2: attention logits capped at 50
    # "eager": plain matmuls (the reference); "sdpa": PyTorch's fused kernel, used only where no
    # soft-cap applies (Gemma 1); with attn_softcap set, "sdpa" runs eager; "flex": PyTorch's
    # flex_attention, compiled, with the soft-cap as a score modification. See gemma.py.
    attn_implementation: str = "sdpa"
    final_softcap: float | None = 30.0  # Gemma 2: output logits capped at 30 (off in transfer)
    sliding_window: int | None = None  # local layers' window; None = big_vision (no window)

    @property
    def post_norms(self) -> bool:
        """Gemma 2 normalises the outputs of attention and MLP before the residual add."""
        return self.version == 2

    def is_local_layer(self, layer: int) -> bool:
        """Gemma 2 alternates local (even) and global (odd) layers; only local ones use the window."""
        return self.version == 2 and self.sliding_window is not None and layer % 2 == 0

    def __post_init__(self):
        if self.version not in (1, 2):
            raise ValueError(f"Gemma version must be 1 or 2, got {self.version}")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))}, "
                             f"got {self.attn_implementation!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


@dataclass(frozen=True)
class PaliGemmaConfig:
    """The whole vision-language model: image encoder, linear projector, Gemma decoder."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches


def check_context(text: TextConfig, image_tokens: int, text_tokens: int, what: str) -> None:
    """Raise BadInput unless image_tokens + text_tokens fit in the decoder's context
    (`max_positions`). Gemma was trained on 8192 positions; RoPE would compute past them, but
    what it computes there was never trained. Prompts are refused, never cut. `what` names
    the input in the message, e.g. "prompt 0" or "data.jsonl line 7"."""
    total = image_tokens + text_tokens
    if total > text.max_positions:
        raise BadInput(f"{what}: {image_tokens} image tokens + {text_tokens} text tokens = {total} positions, "
                       f"more than the model's context of {text.max_positions} (max_position_embeddings)")


# ---------------------------------------------------------------------------------------------
# Presets. The official ones: docs/architecture.md §2.1 (SigLIP) and §4.1 (the decoders).

def _gemma_2b() -> TextConfig:
    """Gemma 1 2B, the decoder of PaliGemma 1: multi-query attention, no soft-caps."""
    return TextConfig(version=1, width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1,
                      head_dim=256, query_pre_attn_scalar=256, attn_softcap=None, final_softcap=None)


def _gemma2(size: str) -> TextConfig:
    """Gemma 2 2B/9B/27B. The 27B scales queries by width/heads = 144, not head_dim = 128."""
    shapes = {  # width, depth, mlp_dim, heads, kv_heads, head_dim, query_pre_attn_scalar
        "2b": (2304, 26, 9216, 8, 4, 256, 256),
        "9b": (3584, 42, 14336, 16, 8, 256, 256),
        "27b": (4608, 46, 36864, 32, 16, 128, 144),
    }
    width, depth, mlp_dim, heads, kv_heads, head_dim, scalar = shapes[size]
    return TextConfig(version=2, width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=scalar)


def _official_presets() -> dict[str, PaliGemmaConfig]:
    """The 12 released variants: PaliGemma 3B and PaliGemma 2 3B/10B/28B at 224/448/896 px."""
    decoders = {"paligemma-3b": _gemma_2b(), "paligemma2-3b": _gemma2("2b"),
                "paligemma2-10b": _gemma2("9b"), "paligemma2-28b": _gemma2("27b")}
    return {f"{name}-{res}": PaliGemmaConfig(vision=VisionConfig(image_size=res), text=text)
            for name, text in decoders.items() for res in (224, 448, 896)}


PRESETS: dict[str, PaliGemmaConfig] = {
    **_official_presets(),
    # Seconds on a laptop CPU: every mechanism of PaliGemma 2 (GQA ratio 2, soft-caps,
    # post-norms, a query scalar different from head_dim) at toy width.
    "tiny": PaliGemmaConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=64, depth=2, mlp_dim=128, num_heads=4),
        text=TextConfig(version=2, vocab_size=512, width=64, depth=2, mlp_dim=128, num_heads=4,
                        num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24),
    ),
    # The same at Gemma 1: multi-query attention, no soft-caps, no post-norms.
    "tiny-gemma1": PaliGemmaConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=64, depth=2, mlp_dim=128, num_heads=4),
        text=TextConfig(version=1, vocab_size=512, width=64, depth=2, mlp_dim=128, num_heads=4,
                        num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, attn_softcap=None,
                        final_softcap=None),
    ),
}


def get_config(name: str) -> PaliGemmaConfig:
    """Return the named preset, e.g. "paligemma2-3b-224", "paligemma-3b-448" or "tiny"."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
