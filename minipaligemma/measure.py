"""Measuring on a CPU or a GPU: wall-clock time taken in turns, the token clock of a decode, peak
memory, copy bandwidth, peak FLOP/s, and the FLOPs and bytes a model's work costs. bench.py runs
the comparison of ours and transformers with these; this module only measures.

- Time is wall clock, the device's queue drained before and after the call. `take_turns` runs
  every measurement once to warm up, then `repeats` rounds in which they take turns, and keeps
  each one's median, so that a busy shared machine slows every contender alike.
- A decode is timed token by token (`TokenClock`): the clock is read as each new token becomes
  known, and tokens/s = B * (new tokens - 1) / (last - first) covers the decoding steps alone,
  without the prefill that produced the first token.
- Peak memory is what a call adds on top of what was allocated before it (weights, mostly): on
  a GPU `torch.cuda.max_memory_allocated`; on a CPU the growth of the process's peak resident
  set (Linux's VmHWM, reset through /proc/self/clear_refs) after glibc's malloc_trim has handed
  freed pages back; still only as good as the allocator's bookkeeping, so figures of a few MiB
  (tiny models) are noise.
- Utilisation on a GPU: MFU = model FLOPs of a training step (6 * parameters * tokens, per
  tower, attention scores left out; LoRA: `lora_train_flops`) / time / the device's peak bf16
  FLOP/s, from its datasheet or measured on a large matrix product; MBU = bytes a
  decode step must read (the decoder's weights as stored, the output embedding included, and
  the KV cache) / time per step / the copy bandwidth measured with a large device-to-device copy.
"""

import ctypes
import gc
import re
import statistics
import time
from collections.abc import Callable

import torch

from .config import PaliGemmaConfig
from .paligemma import PaliGemma
from .quantize import state_bytes

# Dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name(); the first
# match wins. Pass --peak-tflops for a device not listed.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12)]


FILL_ROWS = 4096  # rows drawn at a time by random_model: its float32 temporaries stay small


@torch.no_grad()
def random_model(config: PaliGemmaConfig, dtype: torch.dtype | str, device="cpu", seed: int = 0) -> PaliGemma:
    """A PaliGemma with random weights made in `dtype` from the start, for benches that only
    need the shapes to be real: built on the meta device, then each tensor allocated in `dtype`
    and filled a few rows at a time with float32 draws from `seed` (the same numbers whatever the
    dtype), matrices N(0, 1/fan_in), vectors (norm scales, biases) N(0, 0.5²). A 3B in bfloat16
    thus never has a float32 copy (12 GiB). The numbers are drawn on the model's device (a GPU
    draws a 3B's in a second, one CPU core in half a minute), so they differ between a CPU and
    a GPU. On the meta device nothing is drawn."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device)
    with torch.device("meta"):
        model = PaliGemma(config).to(dtype)
    model = model.to_empty(device=device)
    if device.type == "meta":
        return model
    gen = torch.Generator(device).manual_seed(seed)
    for p in model.parameters():
        rows = p.view(p.shape[0], -1) if p.dim() > 1 else p.view(1, -1)  # [out, in * ...] or [1, n]
        std = rows.shape[1] ** -0.5 if p.dim() > 1 else 0.5
        for start in range(0, rows.shape[0], FILL_ROWS):
            block = rows[start:start + FILL_ROWS]
            block.copy_(torch.randn(block.shape, generator=gen, device=device) * std)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of fn takes (the device's queue drained before and after)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def take_turns(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Run each measurement once to warm up, then `repeats` rounds in which they take turns;
    return each one's median. A run returns its own figure (seconds, tokens/s)."""
    for run in runs.values():
        run()
    figures: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            figures[name].append(run())
    return {name: statistics.median(values) for name, values in figures.items()}


class TokenClock:
    """The times at which new tokens become known, fed by our `decode`'s on_token hook and by
    transformers' streamer interface (`put`, `end`), so both are timed at the same moment."""

    def __init__(self):
        self.times: list[float] = []

    def on_token(self, row: int, token: int) -> None:  # ours: called per row, row 0 first
        if row == 0:
            self.times.append(time.perf_counter())

    def put(self, value: torch.Tensor) -> None:  # transformers: the prompt [B, T], then each step's tokens [B]
        if value.dim() == 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def tokens_per_second(self, batch: int) -> float:
        """Tokens of all rows per second over the decoding steps (the first token, which the
        prefill produced, starts the clock)."""
        return batch * (len(self.times) - 1) / (self.times[-1] - self.times[0])


def proc_kib(path: str, field: str) -> int:
    """The number of a "<field>: <number> kB" line of a Linux /proc file, in KiB."""
    with open(path) as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _release_free_memory() -> None:
    """Hand the pages the C allocator keeps after frees back to the OS (glibc's malloc_trim), so
    that a later allocation shows up as resident-set growth instead of reusing them unseen."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: figures may then read low
        pass


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB that one call of fn adds at its peak, above what was in use before (module docstring);
    None on a CPU without Linux's /proc."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        _release_free_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident set
        before = proc_kib("/proc/self/status", "VmHWM")
    except OSError:
        return None
    fn()
    return (proc_kib("/proc/self/status", "VmHWM") - before) / 1024


def copy_bandwidth(device: torch.device, size: int = 2**30) -> float:
    """Bytes per second that a device-to-device copy of `size` bytes moves (read + write)."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = take_turns({"copy": lambda: timed(lambda: dst.copy_(src), device)}, repeats=5)["copy"]
    return 2 * size / seconds


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s that one product of two random [size, size] matrices in `dtype` reaches on the
    device, measured: 2 size³ over the median time. The denominator of MFU measured in the same
    run, where `peak_flops` reads the datasheet's figure, which no real product reaches."""
    a, b = torch.randn(2, size, size, device=device).to(dtype)  # [size, size] each
    seconds = take_turns({"matmul": lambda: timed(lambda: a @ b, device)}, repeats)["matmul"]
    return 2 * size**3 / seconds


def peak_flops(device: torch.device, given_tflops: float | None) -> float | None:
    """The device's peak bf16 FLOP/s: given, else looked up by name (None if unknown)."""
    if given_tflops is not None:
        return given_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def count_parameters(module: torch.nn.Module) -> int:
    """How many numbers the module's parameters hold."""
    return sum(p.numel() for p in module.parameters())


def train_flops(model: PaliGemma, batch: int, text_len: int) -> float:
    """Model FLOPs of one training step: 6 per parameter per token it transforms. The image
    encoder sees the patches, the decoder's blocks image + text tokens, the output embedding the
    text tokens (its input lookup costs nothing)."""
    image = model.config.num_image_tokens
    embedding = model.llm.embed.weight.numel()
    per_example = (count_parameters(model.vision) * image + count_parameters(model.projector) * image
                   + (count_parameters(model.llm) - embedding) * (image + text_len) + embedding * text_len)
    return 6.0 * batch * per_example


def lora_train_flops(model: PaliGemma, batch: int, text_len: int) -> float:
    """Model FLOPs of one training step of LoRA adapters on the decoder (lora.add_lora with
    decoder targets, everything else frozen), counted as `train_flops` counts but by what each
    weight does: the image encoder and projector only run forward (2 per parameter per image
    token: nothing below them trains, so no gradient flows back through them); the frozen
    decoder runs forward and passes the gradient back to its input, without weight gradients
    (4 per parameter per token; the tied embedding's readout, per text token); every adapter
    parameter costs 6, as any trained weight."""
    if any(p.requires_grad for p in [*model.vision.parameters(), *model.projector.parameters()]):
        raise ValueError("lora_train_flops counts adapters on the decoder only; the image side has trainable weights")
    image = model.config.num_image_tokens
    embedding = model.llm.embed.weight.numel()
    adapters = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    frozen = count_parameters(model.llm) - embedding - adapters
    per_example = (2 * (count_parameters(model.vision) + count_parameters(model.projector)) * image
                   + (4 * frozen + 6 * adapters) * (image + text_len) + 4 * embedding * text_len)
    return float(batch * per_example)


def decode_step_bytes(model: PaliGemma, batch: int, context: int) -> float:
    """Bytes one decode step must read: every decoder weight as stored (the output embedding
    whole; for a quantized decoder its codes, scales and zero points) and the keys and values of
    `context` cached positions per row, in the dtype of the model's float parameters."""
    t = model.config.text
    cache = 2 * t.depth * t.num_kv_heads * t.head_dim * context * batch
    return state_bytes(model.llm) + cache * next(model.parameters()).element_size()
