"""The bug museum: mistakes that PaliGemma implementations shipped or that ports make easily,
each reproduced as a one-line variant of this package, with the symptom it causes and the tool
that catches it.

docs/bug-museum.md lists the exhibits with their measured symptoms; notebook 6 walks through
them. Every exhibit is a `Bug`, and `bug.applied(model)` is a context manager: inside the `with`
block the bug is in place, afterwards everything is as it was. Nothing in the package's modules
is switched by a flag; a bug is one of
- a function or method of the package with one line changed, put in place of the original only
  inside the block (`replaced` for a function, `mock.patch.object` for a method);
- an attribute of the model (a config, a submodule) set to another value inside the block;
- a changed input pipeline (`encode_example`, `Tokenizer.encode`): the model itself untouched.

A patched function is patched for every model at once, so a comparison runs the correct model
outside the block and the buggy one inside it (`layer_report`, `logit_error`).

The tools that catch the bugs:
- `layer_report`: `compare.compare_layers` between the model with and without the bug (in
  practice: ours against transformers or big_vision); the first divergence says where to look.
- property checks, facts every correct implementation has: `prefix_is_bidirectional`,
  `padding_is_invisible`, `suffix_is_causal`, `loss_ignores_prompt`, `layout_is_big_visions`,
  `loc_tokens_are_whole`.
- a generation check on a model that has learnt something: `train_caption_model` trains a tiny
  PaliGemma in seconds to caption 8 scenes of one shape each; it reads the image (a blank image
  gets no right caption), so a bug that breaks the image or the prompt shows in `captions`.

Last, the checks of notebook 6's exercises: each runs the learner's function on the correct
model or data and on the bugs it is meant to catch, and prints one line (`check_*`).
"""

from __future__ import annotations

import itertools
import math
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import torch
from PIL import Image
from torch import nn

from .compare import Report, compare_layers, paligemma_hf_layer_pairs
from .config import PaliGemmaConfig, get_config
from .data import World
from .gemma import RMSNorm, rotate
from .generate import generate
from .image import preprocess
from .paligemma import PaliGemma, block_mask, prefix_lm_loss
from .scenes import WorldConfig
from .tokenizer import (BOS_ID, EOS_ID, PAD_VALUES, PALIGEMMA_TOKENS, SEPARATOR, Tokenizer, encode_example,
                        loc_token, pad_batch, train_tokenizer)
from .tokenizer import USER_DEFINED, _piece_record, _processor  # how Tokenizer appends <loc>/<seg>, to undo it

TINY = get_config("tiny")  # every mechanism of PaliGemma 2 at toy width (query scalar 24, head_dim 16)


# ---------------------------------------------------------------------------------------------
# Putting a bug in place for the duration of a `with` block.

@contextmanager
def replaced(function: Callable, replacement: Callable) -> Iterator[None]:
    """Inside the block, every module of the package that holds `function` (the module defining
    it and each that imported it by name) holds `replacement` instead; restored afterwards."""
    holders = [(module, name) for module_name, module in list(sys.modules.items())
               if module_name.split(".")[0] == "minipaligemma"
               for name, value in list(vars(module).items()) if value is function]
    for module, name in holders:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name in holders:
            setattr(module, name, function)


@contextmanager
def swapped(obj: object, **values) -> Iterator[None]:
    """Inside the block, obj's attributes have the given values (a config, a submodule); restored
    afterwards."""
    saved = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


@contextmanager
def _with_text_config(model: PaliGemma, **changes) -> Iterator[None]:
    """The model's decoder config changed wherever the model reads it (PaliGemma, Gemma, each
    Attention), inside the block."""
    text = replace(model.config.text, **changes)
    with ExitStack() as stack:
        stack.enter_context(swapped(model, config=replace(model.config, text=text)))
        stack.enter_context(swapped(model.llm, config=text))
        for layer in model.llm.layers:
            stack.enter_context(swapped(layer.attn, cfg=text))
        yield


@dataclass(frozen=True)
class Bug:
    """One exhibit: what the bug is, who shipped it, what one sees, which tool catches it, and
    `applied(model)`, the context manager that puts it in place.

    `config` is the correct model the bug is shown on: the tiny preset, or a variant of it where
    the bug needs one (a transfer model with its final soft-cap off, for instance).
    """

    name: str
    change: str  # the one line, as it reads in the buggy implementation
    shipped: str  # where it was met, and the docs/ page that explains the right behaviour
    symptom: str  # what it does to the outputs, as measured in notebook 6 and tests/test_museum.py
    caught_by: str  # the tool
    applied: Callable[[PaliGemma | None], AbstractContextManager]  # input-pipeline bugs ignore the model
    config: PaliGemmaConfig = TINY


# ---------------------------------------------------------------------------------------------
# The buggy variants, each the package's own code with one line changed.

def rmsnorm_times_w(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm.forward with the gain w instead of 1 + w."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # [..., D]
    return (normed * self.weight.float()).to(x.dtype)  # the bug: w, not (1 + w)


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """gemma.rotate with RoFormer's interleaved pairs: channels (2d, 2d + 1) turn together,
    instead of Gemma's half-split pairs (d, d + H/2)."""
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., 0::2], x32[..., 1::2]  # [B, heads, T, H/2] each: the bug, pairs interleaved
    cos, sin = cos[..., :half], sin[..., half:]  # [B, 1, T, H/2]: pair d's angle
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).to(x.dtype)


_EMBED_IMAGE = PaliGemma.embed_image


def embed_image_times_sqrt_width(self: PaliGemma, pixel_values: torch.Tensor) -> torch.Tensor:
    """PaliGemma.embed_image with the text embeddings' sqrt(width) applied to image tokens too."""
    return _EMBED_IMAGE(self, pixel_values) * math.sqrt(self.config.text.width)  # [B, P, D]


def embed_image_over_sqrt_width(self: PaliGemma, pixel_values: torch.Tensor) -> torch.Tensor:
    """PaliGemma.embed_image divided by sqrt(width), never multiplied back."""
    return _EMBED_IMAGE(self, pixel_values) / math.sqrt(self.config.text.width)  # [B, P, D]


def causal_block_mask(q_steps: torch.Tensor, q_valid: torch.Tensor, k_steps: torch.Tensor,
                      k_valid: torch.Tensor) -> torch.Tensor:
    """paligemma.block_mask made plainly causal: query i sees key j iff j <= i (queries are the
    last T of the S keys), so the image and the prompt lose their bidirectional block."""
    t, s = q_steps.shape[1], k_steps.shape[1]
    visible = torch.arange(s)[None, None, :] <= torch.arange(s - t, s)[None, :, None]  # [1, T, S]: the bug
    return visible & k_valid[:, None, :] & q_valid[:, :, None]


def block_mask_with_pads(q_steps: torch.Tensor, q_valid: torch.Tensor, k_steps: torch.Tensor,
                         k_valid: torch.Tensor) -> torch.Tensor:
    """paligemma.block_mask without the padding column mask: padding keys are seen."""
    visible = k_steps[:, None, :] <= q_steps[:, :, None]  # [B, T, S]
    return visible & q_valid[:, :, None]  # the bug: k_valid left out


def _example_variant(change: Callable[[dict], dict]) -> Callable:
    """encode_example followed by `change` on its lists (the original is held by this closure,
    so that `replaced` may swap the package's name for the variant)."""
    original = encode_example

    def variant(tokenizer: Tokenizer, prefix: str, suffix: str | None = None) -> dict[str, list[int]]:
        return change(original(tokenizer, prefix, suffix))
    return variant


example_without_bos = _example_variant(lambda ex: {key: values[1:] for key, values in ex.items()})
example_without_token_types = _example_variant(lambda ex: {**ex, "mask_ar": [0] * len(ex["mask_ar"])})
example_with_labels_everywhere = _example_variant(lambda ex: {**ex, "mask_loss": list(ex["mask_input"])})


def plain_sentencepiece(tokenizer: Tokenizer):
    """The tokenizer's SentencePiece model without the <loc>/<seg> pieces that Tokenizer appended
    at load time: Gemma's own tokenizer, as a pipeline that forgets to add them has it."""
    appended = b"".join(_piece_record(piece, USER_DEFINED) for piece in PALIGEMMA_TOKENS)
    if not tokenizer.model_proto.endswith(appended):
        raise ValueError("this tokenizer's model file came with its own <loc>/<seg> pieces")
    return _processor(tokenizer.model_proto[:-len(appended)])


@contextmanager
def _without_paligemma_pieces(model: PaliGemma) -> Iterator[None]:
    """Every Tokenizer encodes through its plain SentencePiece model inside the block (the model
    is left as it is: the bug is in the tokenizer)."""
    processors = {}

    def encode(self: Tokenizer, text: str) -> list[int]:
        """Tokenizer.encode through the plain SentencePiece model: "<loc0012>" becomes pieces."""
        if id(self) not in processors:
            processors[id(self)] = plain_sentencepiece(self)
        return processors[id(self)].encode(text)  # the bug: a model file without the 1152 added pieces
    with mock.patch.object(Tokenizer, "encode", encode):
        yield


@contextmanager
def _as_gemma1(model: PaliGemma) -> Iterator[None]:
    """PaliGemma 2 weights run through Gemma 1 blocks: no post-norms, no soft-caps, queries
    scaled by head_dim; the post-norm weights are dropped, as a non-strict load drops them."""
    with ExitStack() as stack:
        stack.enter_context(_with_text_config(model, version=1, attn_softcap=None, final_softcap=None,
                                              query_pre_attn_scalar=model.config.text.head_dim))
        for layer in model.llm.layers:
            stack.enter_context(swapped(layer, post_attention_norm=nn.Identity(), post_ffw_norm=nn.Identity()))
        yield


SLIDING_WINDOW = 24  # the tiny stand-in for Gemma 2's 4096: 16 image tokens + 8 text tokens fit in it

BUGS: dict[str, Bug] = {bug.name: bug for bug in [
    Bug(name="rmsnorm-w",
        change="return normed * w",
        shipped="ports of Gemma that reuse the RMSNorm of most other models (LLaMA's); Gemma's "
                "multiplies by 1 + w, w stored from 0 (docs/architecture.md §4.5)",
        symptom="every normalised vector shrinks by the small stored w: logits off by several "
                "units, the trained model's captions empty",
        caught_by="compare_layers: first divergence at llm.layers.0 (its first norm)",
        applied=lambda model: mock.patch.object(RMSNorm, "forward", rmsnorm_times_w)),
    Bug(name="rope-interleaved",
        change="x1, x2 = x[..., 0::2], x[..., 1::2]",
        shipped="code written for RoFormer's interleaved pairs, or weights permuted for them; "
                "Gemma pairs channel d with d + H/2 (docs/architecture.md §4.4)",
        symptom="attention scores change, yet still depend on relative positions only, so the "
                "RoPE property test passes",
        caught_by="compare_layers: first divergence at llm.layers.0 (its attention)",
        applied=lambda model: replaced(rotate, rotate_interleaved)),
    Bug(name="image-times-sqrt-width",
        change="image_tokens * sqrt(width)",
        shipped="ports that scale every decoder input by sqrt(D) like text, copied without "
                "transformers 4.x's matching division (docs/differences.md §1)",
        symptom="image tokens 8x (sqrt(64)) too large: layer 0's norm and attention agree, as "
                "RMSNorm ignores scale; its residual stream does not",
        caught_by="compare_layers: the projector agrees, llm.layers.0 diverges",
        applied=lambda model: mock.patch.object(PaliGemma, "embed_image", embed_image_times_sqrt_width)),
    Bug(name="image-over-sqrt-width",
        change="image_tokens / sqrt(width)",
        shipped="transformers 4.x's division by sqrt(D) kept in a port whose decoder does not "
                "multiply image tokens back (docs/differences.md §1)",
        symptom="image tokens 8x too small: logits change, yet a small trained model still "
                "answers, only its loss rises: a generation check misses it",
        caught_by="compare_layers: the projector agrees, llm.layers.0 diverges",
        applied=lambda model: mock.patch.object(PaliGemma, "embed_image", embed_image_over_sqrt_width)),
    Bug(name="head-dim-scale",
        change="q * head_dim**-0.5",
        shipped="PaliGemma 2 28B (Gemma 2 27B) scales queries by 1/sqrt(144), not "
                "1/sqrt(head_dim = 128) (Gemma 2, arXiv 2408.00118; docs/architecture.md §4.3); "
                "the tiny preset has 24 against 16 so that this shows",
        symptom="every attention sharper than trained (scores x sqrt(144 / 128) in the 28B, "
                "x sqrt(24 / 16) here)",
        caught_by="compare_layers: first divergence at llm.layers.0 (its attention)",
        applied=lambda model: _with_text_config(model, query_pre_attn_scalar=model.config.text.head_dim)),
    Bug(name="gemma1-block",
        change="text_config without model_type: gemma2",
        shipped="transformers builds Gemma 1 blocks for a PaliGemma 2 config that omits the "
                "decoder's model_type, and a non-strict load drops the post-norm weights "
                "(docs/differences.md §14)",
        symptom="no post-norms, no soft-caps, another query scale: another function, though a "
                "small trained model still answers most captions",
        caught_by="strict loading (unexpected post-norm keys); compare_layers: first divergence "
                  "at llm.layers.0",
        applied=_as_gemma1),
    Bug(name="causal-prefix",
        change="mask = causal",
        shipped="transformers 5.x's PaliGemma 1 called without token_type_ids (eager attention: "
                "causal everywhere; docs/differences.md §7)",
        symptom="image and prompt tokens no longer see later ones: the prefix block is lost",
        caught_by="property: prefix tokens see each other both ways",
        applied=lambda model: replaced(block_mask, causal_block_mask)),
    Bug(name="pads-attended",
        change="mask = visible & q_valid",
        shipped="transformers 4.x training masks, where padding became visible again "
                "(issue #35855; docs/differences.md §7)",
        symptom="a prompt's logits change with the padding added to fit a batch",
        caught_by="property: padding changes no real token's output",
        applied=lambda model: replaced(block_mask, block_mask_with_pads)),
    Bug(name="token-types-missing",
        change="mask_ar = [0] * len(tokens)",
        shipped="training batches whose token types are all 0, so the suffix is bidirectional "
                "(transformers 5.x's PaliGemma 1 without token_type_ids under SDPA; "
                "docs/differences.md §7)",
        symptom="label leakage: each answer token sees the next one, the training loss falls to "
                "~0, the captions stay wrong",
        caught_by="property: a suffix logit never depends on later tokens; the layout check; a "
                  "generation check after training",
        applied=lambda model: replaced(encode_example, example_without_token_types)),
    Bug(name="labels-everywhere",
        change="mask_loss = mask_input",
        shipped="fine-tuning scripts that set labels = input_ids, so the prompt is supervised "
                "too (docs/sequence-and-masks.md §6)",
        symptom="the fixed prompt is supervised too: the loss is no longer the answers' loss",
        caught_by="property: the loss ignores the prompt's logits; the layout check",
        applied=lambda model: replaced(encode_example, example_with_labels_everywhere)),
    Bug(name="no-bos",
        change="prompt = encode(prefix) + encode('\\n')",
        shipped="prompts built without <bos> (docs/sequence-and-masks.md §1): Gemma never saw a "
                "sequence without it",
        symptom="every text position shifts and the first text token is another: the caption "
                "model's loss rises and it misses captions",
        caught_by="the layout check: encode_example against the layout written out by hand",
        applied=lambda model: replaced(encode_example, example_without_bos)),
    Bug(name="loc-split",
        change="tokenizer = Gemma's own",
        shipped="a tokenizer file without PaliGemma's 1152 added pieces (docs/architecture.md §5)",
        symptom="<loc0012> becomes 8 sub-word pieces instead of the one id base + 12: box "
                "targets are text, the <loc> embeddings never used",
        caught_by="property: every <locNNNN> is the one token base + NNNN",
        applied=_without_paligemma_pieces),
    Bug(name="final-softcap-in-transfer",
        change="final_softcap = 30.0",
        shipped="transformers' PaliGemma 2 configs keep Gemma 2's final cap (30), which "
                "big_vision turns off for transfer (docs/differences.md §5, docs/training.md §3)",
        symptom="large logits squashed: greedy answers the same; log-probabilities, losses and "
                "beam scores differ",
        caught_by="a logit comparison (every layer agrees: the bug is after the final norm)",
        applied=lambda model: _with_text_config(model, final_softcap=30.0),
        config=replace(TINY, text=replace(TINY.text, final_softcap=None))),
    Bug(name="sliding-window",
        change="sliding_window = 4096",
        shipped="Gemma 2's window on the local layers (transformers) for PaliGemma 2, which "
                "big_vision trained without one (docs/differences.md §4)",
        symptom="the same function up to the window, another beyond: at 896 px (4096 image "
                "tokens) late tokens lose the first image tokens",
        caught_by="compare_layers on an input longer than the window (never on a short one)",
        applied=lambda model: _with_text_config(model, sliding_window=SLIDING_WINDOW)),
]}


# ---------------------------------------------------------------------------------------------
# Models and inputs the exhibits are shown on.

def random_model(config: PaliGemmaConfig = TINY, seed: int = 0) -> PaliGemma:
    """A model with every parameter random, norms included: matrices N(0, 1/fan_in), vectors
    N(0, 0.5²). A fresh model's zero norm weights would hide `w` versus `1 + w`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PaliGemma(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5))
    return model


def random_inputs(config: PaliGemmaConfig = TINY, text_len: int = 12, pads: int = 0,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Two examples as the model takes them: images [2, 3, R, R]; ids, mask_ar and mask_input
    [2, text_len]. Prefixes of 5 and 8 tokens (mask_ar 0), then a causal suffix; the second
    example's last `pads` tokens are padding (mask_ar 1, mask_input 0)."""
    gen = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    mask_ar = torch.tensor([[0] * p + [1] * (text_len - p) for p in (5, 8)])
    mask_input = torch.ones_like(mask_ar)
    mask_input[1, text_len - pads:] = PAD_VALUES["mask_input"]
    return dict(pixel_values=torch.rand(2, 3, size, size, generator=gen) * 2 - 1,
                input_ids=torch.randint(4, config.text.vocab_size, (2, text_len), generator=gen),
                mask_ar=mask_ar, mask_input=mask_input)


# ---------------------------------------------------------------------------------------------
# Tool 1: comparisons with the correct model.

def layer_report(model: PaliGemma, bug: Bug, inputs: dict[str, torch.Tensor], layers: list[str] | None = None,
                 tol: float = 1e-5) -> Report:
    """compare_layers of the model with the bug against itself without it, on the same inputs.

    `layers` (default: every vision block, the final LayerNorm, the projector, every decoder
    layer and the final RMSNorm) are compared in forward order; the correct run is made outside
    the bug's block, the buggy one inside."""
    names = layers or [ours for ours, _ in paligemma_hf_layer_pairs(model.config)]

    def run(m: PaliGemma) -> torch.Tensor:
        return m(**inputs)

    def run_buggy(m: PaliGemma) -> torch.Tensor:
        with bug.applied(m):
            return m(**inputs)
    return compare_layers(model, model, [(name, name) for name in names], run_buggy, run, tol)


def logit_error(model: PaliGemma, bug: Bug, inputs: dict[str, torch.Tensor]) -> float:
    """max |logits with the bug - logits without| on the same inputs."""
    with torch.no_grad():
        correct = model(**inputs)  # [B, T, V]
        with bug.applied(model):
            buggy = model(**inputs)  # [B, T, V]
    return (buggy - correct).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Tool 2: properties every correct implementation has, each on one fixed random example.

def _probe(model: PaliGemma, prefix_len: int = 5, suffix_len: int = 5, seed: int = 1):
    """One image [1, 3, R, R] and text ids [1, prefix_len + suffix_len] for the property checks."""
    gen = torch.Generator().manual_seed(seed)
    size = model.config.vision.image_size
    pixels = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    ids = torch.randint(4, model.config.text.vocab_size, (1, prefix_len + suffix_len), generator=gen)
    return pixels, ids


def prefix_is_bidirectional(model: PaliGemma) -> bool:
    """The first prompt token's output changes when the last prompt token does: image and prompt
    are one block that sees itself both ways (docs/sequence-and-masks.md §3)."""
    pixels, ids = _probe(model)
    mask_ar = torch.tensor([[0] * 5 + [1] * 5])
    changed = ids.clone()
    changed[0, 4] = (ids[0, 4] + 1) % model.config.text.vocab_size
    with torch.no_grad():
        return not torch.allclose(model(pixels, ids, mask_ar)[0, 0], model(pixels, changed, mask_ar)[0, 0])


def padding_is_invisible(model: PaliGemma) -> bool:
    """A prompt's logits are the same alone and padded with 3 pad tokens as in a batch (mask_ar
    1, mask_input 0; docs/sequence-and-masks.md §2)."""
    pixels, ids = _probe(model, prefix_len=6, suffix_len=0)
    mask_ar = torch.zeros_like(ids)  # a decoding prompt: one block
    pads = torch.full((1, 3), PAD_VALUES["input_ids"])
    padded_ar = torch.cat([mask_ar, torch.full((1, 3), PAD_VALUES["mask_ar"])], 1)
    mask_input = torch.cat([torch.ones_like(ids), torch.full((1, 3), PAD_VALUES["mask_input"])], 1)
    with torch.no_grad():
        alone = model(pixels, ids, mask_ar)  # [1, 6, V]
        padded = model(pixels, torch.cat([ids, pads], 1), padded_ar, mask_input)[:, :6]  # [1, 6, V]
    return torch.allclose(alone, padded, atol=1e-5)


def training_batch(tokenizer: Tokenizer, prefix: str = "caption en",
                   suffix: str = "a red circle") -> dict[str, torch.Tensor]:
    """One training example from `encode_example`, as a batch [1, T] of each list."""
    return pad_batch([encode_example(tokenizer, prefix, suffix)])


def suffix_is_causal(model: PaliGemma, batch: dict[str, torch.Tensor]) -> bool:
    """With the batch's own masks, changing the last token changes no earlier logit: an answer
    token never sees the token it must predict (batch [1, T] from `training_batch`)."""
    ids = batch["input_ids"]  # [1, T]
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % model.config.text.vocab_size
    pixels = _probe(model)[0]
    with torch.no_grad():
        before = model(pixels, ids, batch["mask_ar"], batch["mask_input"])[0, :-1]  # [T - 1, V]
        after = model(pixels, changed, batch["mask_ar"], batch["mask_input"])[0, :-1]  # [T - 1, V]
    return torch.allclose(before, after, atol=1e-5)


def loss_ignores_prompt(batch: dict[str, torch.Tensor]) -> bool:
    """prefix_lm_loss of a batch [1, T] (from `training_batch`) does not change when the logits
    at the prompt's positions do, except at its last token ("\\n"), whose logits predict the
    first answer token (docs/sequence-and-masks.md §6). The prompt is where mask_ar is 0."""
    ids = batch["input_ids"]  # [1, T]
    prompt_len = int((batch["mask_ar"][0] == 0).sum())
    vocab = int(ids.max()) + 1
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, ids.shape[1], vocab, generator=gen)  # [1, T, V]
    changed = logits.clone()
    changed[:, :prompt_len - 1] = torch.randn(1, prompt_len - 1, vocab, generator=gen)  # not the "\n" position
    loss = prefix_lm_loss(logits, ids, batch["mask_loss"])
    return torch.equal(loss, prefix_lm_loss(changed, ids, batch["mask_loss"]))


def layout_is_big_visions(tokenizer: Tokenizer, prefix: str = "caption en", suffix: str = "a red circle") -> bool:
    """encode_example gives `[bos prefix] ["\\n"] [suffix eos]` with mask_ar and mask_loss 0 on the
    prompt and 1 on the answer, as written out here from the tokenizer's pieces
    (docs/sequence-and-masks.md §1-§2)."""
    prompt = [BOS_ID] + tokenizer.encode(prefix) + tokenizer.encode(SEPARATOR)
    answer = tokenizer.encode(suffix) + [EOS_ID]
    steps = [0] * len(prompt) + [1] * len(answer)
    expected = {"input_ids": prompt + answer, "mask_ar": steps, "mask_loss": steps, "mask_input": [1] * len(steps)}
    return encode_example(tokenizer, prefix, suffix) == expected


def loc_tokens_are_whole(tokenizer: Tokenizer) -> bool:
    """Every <locNNNN> string encodes to the single id loc_base + NNNN (docs/architecture.md §5)."""
    return all(tokenizer.encode(loc_token(n)) == [tokenizer.loc_id(n)] for n in range(1024))


# ---------------------------------------------------------------------------------------------
# Tool 3: a generation check on a tiny model that has learnt to caption.

CAPTION_WORLD = WorldConfig(objects=(1, 1), words=(0, 0), grid=8)  # one shape, no text: 16 captions
CAPTION_PROMPT = "caption en"


@dataclass
class CaptionModel:
    """A tiny PaliGemma trained on `images` [n] to answer CAPTION_PROMPT with `targets` [n]."""

    model: PaliGemma
    tokenizer: Tokenizer
    images: list[Image.Image]
    targets: list[str]
    losses: list[float]  # the training loss at every step


def caption_scenes(n: int = 8, size: int = 32) -> tuple[list[Image.Image], list[str]]:
    """The first n scenes of CAPTION_WORLD with n different captions ("a red circle", ...), at size px."""
    world = World(seed=0, config=CAPTION_WORLD)
    found: dict[str, Image.Image] = {}
    for index in itertools.count():
        example = world.example(index, "caption", size)
        found.setdefault(example.suffix, example.image)
        if len(found) == n:
            return list(found.values()), list(found)


def train_caption_model(n: int = 8, steps: int = 250, lr: float = 3e-3, seed: int = 0) -> CaptionModel:
    """Train a tiny PaliGemma (the tiny preset, its vocabulary the tokenizer's) to caption n scenes.

    A tokenizer is trained on the 16 captions of CAPTION_WORLD first, then the model with Adam on
    the whole batch each step; about 6 s on one CPU core. 250 steps: at 150, AVX2-only kernels
    left a run at a loss of 0.5 (3 of 8 captions right). The prompt is the same for every image,
    so the model can only answer right by reading the image. Batches come from `encode_example`,
    so a bug applied to it during training is trained on.
    """
    images, targets = caption_scenes(n)
    _, every_caption = caption_scenes(16)
    with tempfile.TemporaryDirectory() as folder:
        corpus = [f"{CAPTION_PROMPT}\n{caption}" for caption in every_caption] * 20
        tokenizer = train_tokenizer(corpus, 380, Path(folder) / "tokenizer.model")
    config = replace(TINY, text=replace(TINY.text, vocab_size=tokenizer.vocab_size))
    batch = pad_batch([encode_example(tokenizer, CAPTION_PROMPT, target) for target in targets])  # [n, T] each
    pixels = preprocess(images, config.vision.image_size)  # [n, 3, R, R]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PaliGemma(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(pixels, batch["input_ids"], batch["mask_ar"], batch["mask_input"])  # [n, T, V]
        loss = prefix_lm_loss(logits, batch["input_ids"], batch["mask_loss"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return CaptionModel(model.eval(), tokenizer, images, targets, losses)


def caption_loss(model: PaliGemma, tokenizer: Tokenizer, images: list[Image.Image], targets: list[str]) -> float:
    """prefix_lm_loss of the right captions `targets` for `images`, read in the correct layout
    (causal answers, as generation reads them)."""
    batch = pad_batch([encode_example(tokenizer, CAPTION_PROMPT, target) for target in targets])  # [n, T] each
    with torch.no_grad():
        logits = model(preprocess(images, model.config.vision.image_size), batch["input_ids"], batch["mask_ar"],
                       batch["mask_input"])  # [n, T, V]
    return prefix_lm_loss(logits, batch["input_ids"], batch["mask_loss"]).item()


def captions(model: PaliGemma, tokenizer: Tokenizer, images: list[Image.Image]) -> list[str]:
    """Greedy answers to CAPTION_PROMPT, one per image."""
    return generate(model, tokenizer, images, [CAPTION_PROMPT] * len(images), max_new_tokens=8)


def blank_image(size: int = 32) -> Image.Image:
    """A mid-grey image (pixels 0 after scaling to [-1, 1]): nothing to see."""
    return Image.new("RGB", (size, size), (128, 128, 128))


# ---------------------------------------------------------------------------------------------
# The checks of notebook 6's exercises. Each runs the learner's function where the answer is
# known, prints one line, "passes" or what is wrong, and returns that line.

def _verdict(problem: str | None) -> str:
    line = "passes" if problem is None else problem
    print(line)
    return line


def _called(fn: Callable, *args):
    """fn(*args), or the text of what it raised."""
    try:
        return fn(*args), None
    except Exception as err:  # a learner's function may fail in any way: say how, in one line
        return None, f"it raised {type(err).__name__}: {err}"


def _outputs(relative_errors: dict[str, float], scales: dict[str, float], seed: int = 0):
    """Two dicts of layer outputs [4, 16] in forward order: the reference, with values of about
    `scales[name]`, and ours, off by exactly `relative_errors[name]` relative to it."""
    gen = torch.Generator().manual_seed(seed)
    ref, ours = {}, {}
    for name, rel in relative_errors.items():
        ref[name] = torch.randn(4, 16, generator=gen, dtype=torch.float64) * scales[name]
        noise = torch.randn(4, 16, generator=gen, dtype=torch.float64)
        ours[name] = ref[name] + noise * (rel * ref[name].norm() / noise.norm())
    return ours, ref


def check_first_divergence(fn: Callable) -> str:
    """Exercise: `fn(ours, ref, tol)` takes two dicts {layer name: output} in forward order and
    returns the first layer whose relative error ||ours - ref|| / ||ref|| exceeds tol, or None.

    Three cases with known answers: layers that all agree; a first divergence followed by layers
    with larger errors (which inherit it); a layer of large values with a small relative error
    before a layer of small values with a large one."""
    layers = ["vision.blocks.0", "projector", "llm.layers.0", "llm.layers.1", "llm.final_norm"]
    cases = [  # relative errors, value scales, expected answer, what a wrong answer means
        ({name: 1e-7 for name in layers}, {name: 1.0 for name in layers}, None,
         "on layers that all agree to 1e-7 it returned {got!r}, expected None"),
        (dict(zip(layers, [0, 0, 1e-3, 0.5, 0.3])), {name: 1.0 for name in layers}, "llm.layers.0",
         "it returned {got!r}, but llm.layers.0 is the first over the tolerance (the layers after "
         "it inherit its error, and may show more)"),
        (dict(zip(layers, [1e-7, 1e-3, 0, 0, 0])), dict(zip(layers, [1e4, 1e-3, 1, 1, 1])), "projector",
         "it returned {got!r}, whose relative error is 1e-07 (its values are about 1e4): compare "
         "||ours - ref|| / ||ref||, not absolute differences"),
    ]
    for relative_errors, scales, expected, wrong in cases:
        ours, ref = _outputs(relative_errors, scales)
        got, raised = _called(fn, ours, ref, 1e-5)
        if raised:
            return _verdict(raised)
        if not (got is None or isinstance(got, str)):
            return _verdict(f"it must return a layer name (str) or None, got {type(got).__name__}")
        if got != expected:
            return _verdict(wrong.format(got=got))
    return _verdict(None)


def check_padding_property(fn: Callable) -> str:
    """Exercise: `fn(model)` returns True iff padding changes no real token's output. It must say
    True for a correct random model and False for the same model with pads-attended."""
    model = random_model()
    holds, raised = _called(fn, model)
    if raised:
        return _verdict(raised)
    if holds is not True and holds is not False:
        return _verdict(f"it must return True or False, got {holds!r}")
    if not holds:
        return _verdict("it returns False for the correct model: compare only the real tokens' logits, "
                        "and mark the pads as padding (mask_input 0, mask_ar 1)")
    with BUGS["pads-attended"].applied(model):
        holds, raised = _called(fn, model)
    if raised:
        return _verdict(raised)
    if holds:
        return _verdict("it does not catch pads-attended (padding keys seen): are the pads marked "
                        "mask_input 0, after a prompt whose tokens all have mask_ar 0?")
    return _verdict(None)


def check_loss_property(fn: Callable, tokenizer: Tokenizer) -> str:
    """Exercise: `fn(batch)` returns True iff prefix_lm_loss on the batch (one training example
    from `training_batch`) ignores the logits at the prompt's positions. It must say True for a
    correct batch and False for one built with labels-everywhere."""
    holds, raised = _called(fn, training_batch(tokenizer))
    if raised:
        return _verdict(raised)
    if holds is not True and holds is not False:
        return _verdict(f"it must return True or False, got {holds!r}")
    if not holds:
        return _verdict('it returns False for a correct batch: the logits at the last prompt token ("\\n") '
                        "predict the first answer token and count; change only the positions before it")
    with BUGS["labels-everywhere"].applied(None):
        leaky = training_batch(tokenizer)
    holds, raised = _called(fn, leaky)
    if raised:
        return _verdict(raised)
    if holds:
        return _verdict("it does not catch labels-everywhere (loss on the prompt): change the prompt's "
                        "logits differently per token id (a constant added to a whole row changes no softmax)")
    return _verdict(None)
