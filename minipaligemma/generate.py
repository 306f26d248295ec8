r"""Decoding: turn an image and a prompt into new tokens, one at a time, with a KV cache.

The loop follows big_vision's two phases (docs/sequence-and-masks.md §5):

    prefill  the image tokens and the whole prompt go through the model once, filling the KV
             cache; the logit at each row's last real prompt token predicts the first new token.
    extend   each new token goes through the model alone, attending to everything cached, and
             its logit predicts the next token.

Design choices:
- The image is encoded once and the KV cache is allocated once, sized image tokens + prompt
  length + max_new_tokens, so nothing grows while decoding.
- The model calls run under `torch.inference_mode`, which skips all autograd bookkeeping (a
  fifth of the time of a decoding step of a tiny model). What they return are inference
  tensors: read them freely; `.clone()` one to modify it in place or to use it in training.
- Prompts may be padded on either side (`tokenizer.pad_batch` pads on the right). The model
  keeps padding invisible and counts positions over real tokens only, so a padded batch decodes
  exactly as each prompt would alone; only the index of the last real prompt token differs per
  row. A left pad must have mask_ar = 0, else it would split the prefix block in two.
- Each row stops at its own EOS: from then on it is fed padding (invisible to attention) and
  reports nothing; the loop ends when every row is done or after max_new_tokens.
- A sampler is any function from logits [B, V] to token ids [B]: `greedy` (the default, and
  big_vision's), or `sample` with a temperature, top-k and top-p (nucleus) filter, e.g.
  `functools.partial(sample, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(0))`.
  Logits are divided by the temperature first, then top-k, then top-p filter the result, so p
  is a mass under the tempered (and top-k renormalised) distribution. Samplers run in float32.
- `beam_search` is big_vision's `beam_decode`: scores are plain sums of log-probabilities (no
  length normalisation). At every step each live beam may end (its score plus log p(EOS) is a
  finished candidate; the best one per example is kept) or continue with a non-EOS token (the
  best `beam_size` continuations stay live). An example is done when its best live beam scores
  below its best finished sequence: log-probabilities are <= 0, so no continuation can catch up.
  The answer therefore always ends with EOS, placed at the latest on the last step. With
  beam_size 1 this is not greedy decoding: it follows the greedy path with EOS forbidden and
  returns the best of its prefixes + EOS, which scores at least as high as greedy's answer when
  greedy ends with EOS. Each step gathers the cache rows of the surviving beams' parents.
- Logits are the model's as configured: with Gemma 2's final soft-cap on, every step is capped.
  (big_vision leaves the first step uncapped, docs/differences.md §5; greedy decoding cannot
  tell, sampling and beam scores can.)
"""

from collections.abc import Callable, Sequence

import torch

from .compiled import StaticCache, compiled_step
from .config import check_context
from .gemma import attention_implementation
from .image import preprocess
from .paligemma import PaliGemma, PaliGemmaCache
from .tokenizer import EOS_ID, PAD_ID, Tokenizer, encode_example, pad_batch

Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] -> token ids [B]
OnToken = Callable[[int, int], None]  # (row, token id), called as each token is decided


# ---------------------------------------------------------------------------------------------
# Samplers: small pure functions on logits [B, V].

def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: logits [B, V] -> ids [B]."""
    return logits.argmax(dim=-1)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest logits [B, V] (more where the k-th value ties), others -inf."""
    if k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the fewest most likely tokens whose probability mass reaches p.

    Going down the tokens from the most likely, a token is kept while the mass before it is
    still below p, so the most likely token is always kept. Logits [B, V] in, the same with the
    rest set to -inf out.
    """
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)  # [B, V] each
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]
    keep = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, mass_before < p)  # [B, V]
    return logits.masked_fill(~keep, float("-inf"))


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits / temperature), after top-k then top-p filtering.

    logits [B, V] -> ids [B]. A low temperature sharpens the distribution (towards greedy), a
    high one flattens it. Pass a seeded torch.Generator to make the draws reproducible.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive (use `greedy` for temperature 0), got {temperature}")
    logits = logits.float() / temperature  # [B, V]
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]  # [B]


# ---------------------------------------------------------------------------------------------
# The two model calls of decoding.

def new_cache(model: PaliGemma, pixel_values: torch.Tensor, prompt_len: int, max_new_tokens: int,
              static: bool = False) -> PaliGemmaCache:
    """A cache (keys, values and what the masks need of them) for images [B, 3, R, R] (or
    [B, F, 3, R, R]), prompts of prompt_len tokens and up to max_new_tokens new ones, in the
    model's dtype and on its device. static: a cache of fixed shapes (compiled.StaticCache), so
    that every decoding step has the same shapes, which compiled code needs."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    frames = pixel_values.shape[1] if pixel_values.dim() == 5 else 1
    weight = next(model.parameters())
    size = frames * model.config.num_image_tokens + prompt_len + max_new_tokens
    kind = StaticCache if static else PaliGemmaCache
    return kind(model.config.text, pixel_values.shape[0], size, weight.dtype, weight.device)


@torch.inference_mode()
def prefill(model: PaliGemma, pixel_values: torch.Tensor, input_ids: torch.Tensor, mask_ar: torch.Tensor,
            mask_input: torch.Tensor, cache: PaliGemmaCache) -> torch.Tensor:
    """Encode the images, run the prompts [B, T] into the empty cache; return the float32 logits
    [B, V] at each row's last real prompt token, which predict the first new token."""
    states = model.text_states(pixel_values, input_ids, mask_ar, mask_input, cache)  # [B, T, D]
    last = input_ids.shape[1] - 1 - mask_input.long().flip(1).argmax(dim=1)  # [B], any padding side
    return model.llm.logits(states[torch.arange(states.shape[0]), last]).float()  # [B, V]


@torch.inference_mode()
def extend(model: PaliGemma, tokens: torch.Tensor, cache: PaliGemmaCache,
           real: torch.Tensor | None = None) -> torch.Tensor:
    """Feed one new token per row [B] as a causal step after everything cached; return the
    float32 logits [B, V] for the token after it. `real` [B] (default all True) marks rows whose
    token counts; the others are padding, invisible to every later token."""
    ids = tokens[:, None]  # [B, 1]
    mask_input = None if real is None else real[:, None]  # [B, 1]
    return model(None, ids, torch.ones_like(ids), mask_input, cache)[:, 0].float()  # [B, V]


# ---------------------------------------------------------------------------------------------
# Decoding loops on token ids.

def within(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Forbid ids >= vocab_size (None: allow all). transformers' checkpoints carry 64 embedding
    rows past the tokenizer's 257152 (`<image>` and padding) that must never be generated."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    return logits.index_fill(-1, torch.arange(vocab_size, logits.shape[-1], device=logits.device), float("-inf"))


@torch.inference_mode()
def decode(model: PaliGemma, pixel_values: torch.Tensor, input_ids: torch.Tensor, mask_ar: torch.Tensor,
           mask_input: torch.Tensor | None = None, max_new_tokens: int = 32, sampler: Sampler = greedy,
           eos_id: int = EOS_ID, pad_id: int = PAD_ID, on_token: OnToken | None = None,
           vocab_size: int | None = None, compile: bool = False) -> torch.Tensor:
    """Generate up to max_new_tokens tokens after each prompt; return them as ids [B, T_new].

    pixel_values [B, 3, R, R] (or [B, F, 3, R, R]); input_ids, mask_ar, mask_input [B, T]
    as the model takes them (decoding layout `[bos prefix] ["\n"]`, padded on either side). A
    row's tokens run up to and including its EOS, then hold pad_id; T_new is the number of steps
    taken (the loop stops early once every row has its EOS). `on_token(row, token)` sees each of those tokens, EOS
    included, as soon as it is chosen: a streaming hook for printing as the model writes.
    compile: run each decoding step compiled (compiled.py): the same tokens, faster once compiled
    (on a GPU as a CUDA graph), after a first step that compiles. The cache is then static, as
    it is with "flex" attention, which compiles a kernel for every new shape.
    """
    if mask_input is None:
        mask_input = torch.ones_like(input_ids)
    static = compile or attention_implementation(model.config.text) == "flex"
    cache = new_cache(model, pixel_values, input_ids.shape[1], max_new_tokens, static)
    run_step = compiled_step(extend, input_ids.device) if compile else extend
    logits = within(prefill(model, pixel_values, input_ids, mask_ar, mask_input, cache), vocab_size)  # [B, V]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # [B]
    steps = []
    for step in range(max_new_tokens):
        tokens = sampler(logits).masked_fill(done, pad_id)  # [B]
        steps.append(tokens)
        if on_token is not None:
            for row, (token, finished) in enumerate(zip(tokens.tolist(), done.tolist())):
                if not finished:
                    on_token(row, token)
        done = done | (tokens == eos_id)
        if done.all() or step == max_new_tokens - 1:
            break
        logits = within(run_step(model, tokens, cache, real=~done), vocab_size)  # [B, V]
    return torch.stack(steps, dim=1)  # [B, T_new]


@torch.inference_mode()
def beam_search(model: PaliGemma, pixel_values: torch.Tensor, input_ids: torch.Tensor, mask_ar: torch.Tensor,
                mask_input: torch.Tensor | None = None, max_new_tokens: int = 32, beam_size: int = 2,
                eos_id: int = EOS_ID, pad_id: int = PAD_ID, vocab_size: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """big_vision's beam search (module docstring): the most likely EOS-terminated continuation.

    Inputs as for `decode`. Returns ids [B, T_new], each row ending with EOS (then pad_id), and
    their scores [B]: the sum of the log-probabilities of the tokens, EOS included.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if mask_input is None:
        mask_input = torch.ones_like(input_ids)
    b, n = input_ids.shape[0], beam_size
    cache = new_cache(model, pixel_values, input_ids.shape[1], max_new_tokens)
    logits = within(prefill(model, pixel_values, input_ids, mask_ar, mask_input, cache), vocab_size)  # [B, V]
    vocab = logits.shape[-1]
    # Every example starts as n copies of its prompt; all but the first copy score -inf, so the
    # first step picks its n continuations from one beam. (Beams beyond the number of possible
    # sequences keep scoring -inf and never win.)
    cache.select_rows(torch.arange(b, device=logits.device).repeat_interleave(n))
    logits = logits.repeat_interleave(n, dim=0)  # [B * n, V]
    live_scores = torch.full((b, n), float("-inf"), device=logits.device)  # [B, n]
    live_scores[:, 0] = 0.0
    live_tokens = torch.zeros(b, n, 0, dtype=torch.long, device=logits.device)  # [B, n, step]
    best_scores = torch.full((b,), float("-inf"), device=logits.device)  # [B]
    best_tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=logits.device)  # [B, max_new_tokens]
    best_lengths = torch.zeros(b, dtype=torch.long, device=logits.device)  # [B], EOS included
    examples = torch.arange(b, device=logits.device)  # [B]
    is_eos = torch.arange(vocab, device=logits.device) == eos_id  # [V]
    for step in range(max_new_tokens):
        logp = logits.log_softmax(dim=-1).view(b, n, vocab)  # [B, n, V]

        # Each live beam may end here with EOS; keep the best finished sequence per example.
        end_scores, end_beam = (live_scores + logp[..., eos_id]).max(dim=1)  # [B] each
        better = end_scores > best_scores  # [B]
        eos_column = torch.full_like(examples[:, None], eos_id)  # [B, 1]
        ended = torch.cat([live_tokens[examples, end_beam], eos_column], dim=1)  # [B, step + 1]
        best_tokens[better, :step + 1] = ended[better]
        best_scores = torch.where(better, end_scores, best_scores)  # [B]
        best_lengths = best_lengths.masked_fill(better, step + 1)  # [B]
        if step == max_new_tokens - 1:
            break

        # Or continue with any other token: the n best continuations of the example stay live.
        continued = live_scores[..., None] + logp.masked_fill(is_eos, float("-inf"))  # [B, n, V]
        live_scores, choice = continued.view(b, n * vocab).topk(n, dim=-1)  # [B, n] each
        parent, token = choice // vocab, choice % vocab  # [B, n] each
        live_tokens = torch.cat([live_tokens.gather(1, parent[..., None].expand_as(live_tokens)),
                                 token[..., None]], dim=2)  # [B, n, step + 1]
        if (live_scores.max(dim=1).values < best_scores).all():  # no live beam can still win
            break
        cache.select_rows((examples[:, None] * n + parent).flatten())
        logits = within(extend(model, token.flatten(), cache), vocab_size)  # [B * n, V]
    return best_tokens[:, :int(best_lengths.max())], best_scores


# ---------------------------------------------------------------------------------------------
# Text in, text out.

def until_eos(tokens: torch.Tensor, eos_id: int = EOS_ID) -> list[int]:
    """The ids of one row [T_new] before its first EOS."""
    ids = tokens.tolist()
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def generate(model: PaliGemma, tokenizer: Tokenizer, images: Sequence, prompts: Sequence[str],
             max_new_tokens: int = 32, sampler: Sampler = greedy, beam_size: int | None = None,
             max_text_len: int | None = None, on_token: OnToken | None = None,
             resample: str = "bilinear") -> list[str]:
    """Answer each prompt about its image(s); return the answers as text, without EOS.

    images: one entry per prompt (a PIL image, uint8 array or path, or a list of them for
    several frames), preprocessed by `image.preprocess` at the model's resolution. Each prompt
    is laid out as `[bos prompt] ["\n"]` and the batch is right-padded. `max_text_len` (None =
    no limit) is the longest text the model may see, prompt plus answer: a prompt that cannot
    fit with max_new_tokens is an error, never a silent cut; so is one whose image tokens, text
    and max_new_tokens exceed the model's context (`TextConfig.max_positions`). `beam_size`
    switches from the sampler to beam search, which decides its answer only at the end (no
    `on_token` then).
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts: "
                         "give one image (or list of frames) per prompt")
    examples = [encode_example(tokenizer, prompt) for prompt in prompts]
    for i, (example, image) in enumerate(zip(examples, images)):
        frames = len(image) if isinstance(image, (list, tuple)) else 1
        needed = len(example["input_ids"]) + max_new_tokens
        check_context(model.config.text, frames * model.config.num_image_tokens, needed,
                      f"prompt {i} ({len(example['input_ids'])} tokens) with max_new_tokens={max_new_tokens}")
        if max_text_len is not None and needed > max_text_len:
            raise ValueError(
                f"prompt {i} has {len(example['input_ids'])} tokens (bos and \"\\n\" included); with "
                f"max_new_tokens={max_new_tokens} that is {needed}, more than max_text_len={max_text_len}")
    weight = next(model.parameters())
    batch = {key: value.to(weight.device) for key, value in pad_batch(examples).items()}  # [B, T] each
    pixel_values = preprocess(list(images), model.config.vision.image_size, resample)  # [B, (F,) 3, R, R]
    pixel_values = pixel_values.to(weight)  # the model's dtype and device
    inputs = dict(pixel_values=pixel_values, input_ids=batch["input_ids"], mask_ar=batch["mask_ar"],
                  mask_input=batch["mask_input"], max_new_tokens=max_new_tokens, vocab_size=tokenizer.vocab_size)
    if beam_size is None:
        tokens = decode(model, **inputs, sampler=sampler, on_token=on_token)  # [B, T_new]
    elif on_token is not None or sampler is not greedy:
        raise ValueError("beam search picks its answer at the end: it takes neither a sampler nor on_token")
    else:
        tokens, _ = beam_search(model, **inputs, beam_size=beam_size)  # [B, T_new]
    return [tokenizer.decode(until_eos(row)) for row in tokens]
