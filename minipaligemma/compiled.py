"""Decoding under torch.compile: a cache of fixed shapes, and a compiled decode step.

A decoding step of `generate.extend` is a few hundred small operations on one token; on a GPU
the time to launch them exceeds the time they compute. torch.compile fuses them into fewer
kernels, and on a GPU its "reduce-overhead" mode records the whole step once as a CUDA graph
and replays it, launching everything at once. Both need every step to look the same: the same
tensor shapes and nothing that Python decides from a tensor's value.

The ordinary caches (gemma.KVCache, paligemma.MaskCache) are not like that: `length` is a
Python int that grows by one each step, and attention reads the first `length` slots, a shape
that grows too. The static caches here keep the same interface with two changes:

- `length` is a tensor, so the step that advances it is the same computation every time;
  new keys are written at slots `length + arange(T)` with `index_copy_`.
- Attention reads all `max_len` slots every step. Slots not yet written hold zeros and are
  marked invalid in the mask cache, so the mask hides them: the result is the same as reading
  the first `length` slots only (to float rounding), at the cost of attending over a few more
  keys. (Zeros, not uninitialised memory: a masked weight is exactly 0, and 0 times a stray
  NaN in uninitialised memory would still be NaN.)

`compiled_step` compiles `generate.extend` for a device; `generate.decode(compile=True)` uses
both. The prefill runs uncompiled: it happens once per prompt.
"""

import inspect
from collections.abc import Callable

import torch

from .config import TextConfig
from .gemma import KVCache
from .paligemma import MaskCache, PaliGemmaCache


class StaticKVCache(KVCache):
    """gemma.KVCache with a tensor `length`; every update returns all `max_len` slots."""

    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        super().__init__(cfg, batch_size, max_len, dtype, device)
        self.k.zero_()  # [L, B, K, max_len, H]
        self.v.zero_()  # [L, B, K, max_len, H]
        self.length = torch.zeros((), dtype=torch.long, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v [B, K, T, H] at slots length .. length + T - 1; return every
        slot [B, K, max_len, H] (the mask hides those not written yet)."""
        slots = self.length + torch.arange(k.shape[2], device=k.device)  # [T]
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]


class StaticMaskCache(MaskCache):
    """paligemma.MaskCache with a tensor `length`; `append` returns all `max_len` keys."""

    def __init__(self, batch_size: int, max_len: int, device=None):
        super().__init__(batch_size, max_len, device)  # zeros: unwritten keys are invalid
        self.length = torch.zeros((), dtype=torch.long, device=device)

    def last_step_and_count(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step of the last key and the number of real keys so far, [B, 1] each. Steps never
        decrease along the sequence and unwritten slots hold step 0 and are invalid, so these are
        the largest step and the count of valid slots: no Python index of the last key needed."""
        return self.steps.amax(dim=1, keepdim=True), self.valid.sum(dim=1, keepdim=True)

    def append(self, steps: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor):
        """Note the new keys' steps, validity and positions [B, T] at slots length .. length + T - 1;
        return those of every slot, [B, max_len] each."""
        slots = self.length + torch.arange(steps.shape[1], device=steps.device)  # [T]
        self.steps.index_copy_(1, slots, steps)
        self.valid.index_copy_(1, slots, valid)
        self.positions.index_copy_(1, slots, positions)
        self.length += steps.shape[1]
        return self.steps, self.valid, self.positions


class StaticCache(PaliGemmaCache):
    """A PaliGemmaCache built from the two static caches: the same calls, fixed shapes."""

    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        self.kv = StaticKVCache(cfg, batch_size, max_len, dtype, device)
        self.mask = StaticMaskCache(batch_size, max_len, device)
        # Compiled steps write into these tensors in place. Marked as living at a fixed address,
        # a CUDA graph may keep pointing at them between replays instead of copying them in.
        for buffer in (self.kv.k, self.kv.v, self.kv.length, self.mask.steps, self.mask.valid,
                       self.mask.positions, self.mask.length):
            torch._dynamo.mark_static_address(buffer)


def compiled_step(step: Callable, device: torch.device) -> Callable:
    """`step` (generate.extend) under torch.compile: with CUDA graphs on a GPU ("reduce-overhead"),
    fused kernels on a CPU. The first call with a new batch size or cache length compiles (tens
    of seconds on a CPU); later calls with the same shapes replay what was compiled.

    What is compiled is `step` without its `torch.inference_mode` decorator (inspect.unwrap):
    torch 2.13's compiler fails on entering inference mode inside the compiled code ("Cannot
    set version_counter for inference tensor"). Call the result under inference mode, as
    generate.decode does."""
    return torch.compile(inspect.unwrap(step), mode="reduce-overhead" if device.type == "cuda" else None,
                         dynamic=False)
