"""The GPU check in one call: the fast paths checked against the reference on the device, then
PaliGemma 2 3B-224's decoding speed and a training step's use of the device, all measured in one
run, so that a GPU lent for a few minutes yields every figure at once.

    python -m minipaligemma bench --config gpu                  # one H100/H200: at most 4 minutes
    python -m minipaligemma bench --config gpu --device cpu     # the same code at tiny sizes (the tests run it)
    python -m minipaligemma bench --config attention            # what each attention path costs here (CPU or GPU)

`--config gpu` runs four parts, in this order (`PLANS` says what each covers on a GPU and on a CPU):

1. The device: the bandwidth of a 1 GiB device-to-device copy (measure.copy_bandwidth) and the
   FLOP/s of a large matrix product in the training dtype (measure.matmul_flops), the
   denominators of MBU and MFU, measured rather than read off a datasheet.
2. Checks, on random weights (measure.random_model), for the tiny and the full-width configs
   (bench.cases) and, prefill only, PaliGemma 1 at toy width ("tiny-gemma1": no soft-caps,
   multi-query attention), each in float32 and in bfloat16 (on a CPU: decoding in float32 only):
     prefill  the logits of a padded batch (a prompt, then a causal suffix; one row ends in
              padding): "flex" attention against "eager"; and "sdpa" against "eager" on the same
              weights with the attention soft-cap off, because sdpa cannot soft-cap (with the cap
              on, "sdpa" runs eager and there is nothing to compare).
     decode   decode on "flex" attention (uncompiled steps on a cache of fixed shapes), and the
              compiled decode (decode(compile=True) on "flex"), against decode on "eager", from the same padded prompts. The fast path is fed the
              reference's greedy tokens (teacher forcing), so that each step compares logits
              after the same prefix; its own greedy choice must equal the reference's wherever
              the reference's two best logits lie further apart than twice the tolerated error
              (closer than that, either choice is right and rounding decides).
   The error is max |difference| over the real tokens divided by max |reference logit| there,
   the logit scale. TOLERANCE holds the bounds and why. A failed check prints FAILED; the run
   goes on.
3. Speed of PaliGemma 2 3B-224 in bfloat16 (random weights: transformers' initialisation, loaded
   into ours by the strict loader, as bench.py does), 256 image + 16 text tokens:
     prefill  ms at batch 1: ours eager, ours flex, transformers (eager: Gemma 2 soft-caps).
     decode   tokens/s at batch 1, 8 and 32, greedy, EOS off: ours eager; ours compiled (flex
              attention and decode(compile=True): on a GPU each step replays a CUDA graph);
              ours "compiled eager" (eager attention, which the compiler fuses itself);
              transformers' generate, eager; and generate with its static cache, which it
              compiles itself on a GPU (asked to on a CPU). A row that fails says why.
     MBU      bytes one step must read (measure.decode_step_bytes: weights and KV cache) x
              steps/s / the copy bandwidth.
   Every figure is the median of `repeats` calls after a first, cold one; the cold call's extra
   time over a steady call is reported beside it as the compile time.
4. Training steps: the trainer's small preset at 224 px (full fine-tuning, float32 weights
   under bfloat16 autocast, as the trainer runs on a GPU) and the 3B with LoRA (stage 3's
   preparation, train.Transfer: rank 16 on lora.DEFAULT_TARGETS, bfloat16 base), each at the
   largest batch of a short list that fits in device memory; MFU = model FLOPs
   (measure.train_flops, measure.lora_train_flops) / step time / the measured matmul FLOP/s.

Time: on a GPU the run must fit in 4 minutes. Each part starts no new measurement after its
time (`Plan.ends_s`, seconds from the start), so a slow part cannot take the time of every later
one and the report still comes out; what did not fit is listed as skipped. Each row is printed
(flushed) as soon as it is measured, and the log and the JSON file under runs/gpu-bench/ are
rewritten (atomically) after every row, so a run killed by a time limit keeps what it measured.
A part that raises is recorded as failed, with the error, and the run goes on. Last come a
table and one line of JSON holding every figure.

`--config attention` measures, for the tiny and the full-width configs in their bench dtype,
prefill ms at batch 1 and decode tokens/s at batch 1 and 8 for each attention path: "eager";
"sdpa" (the row says that Gemma 2's soft-cap makes it run eager); "flex" (uncompiled decoding
on a cache of fixed shapes); "compiled" (flex and decode(compile=True)); "compiled eager" (eager attention and
decode(compile=True)). Each row
names the attention it ran. It shares the measuring helper (`measure_path`) with part 3 and has
no time limit.
"""

import copy
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import date, datetime
from pathlib import Path

import torch

from .bench import NO_EOS, Case, build_pair, cases, machine, make_inputs
from .config import get_config
from .files import BadInput, atomic_write
from .gemma import attention_implementation
from .generate import decode, greedy, new_cache, prefill
from .measure import (TokenClock, copy_bandwidth, decode_step_bytes, lora_train_flops, matmul_flops,
                      peak_flops, peak_memory_mib, random_model, timed, train_flops)
from .paligemma import PaliGemma, set_attention
from .tokenizer import PAD_ID
from .train import Transfer, paligemma_step_loss

OUT = Path("runs/gpu-bench")

# Bounds on the error of a check (module docstring: max |difference| / max |reference logit|).
# float32: the paths differ only in the order of their sums (flex accumulates the softmax block by
# block, sdpa and the compiled step fuse operations); each such difference is a few float32
# ulps (1.2e-7 each) of a logit, and two layers per tower keep the total an order of magnitude
# below 1e-5. bfloat16 rounds every stored activation to 8 bits of mantissa (0.4 %), and the
# paths round at different places (eager rounds the attention weights to bfloat16 before
# multiplying by the values, flex keeps them in float32), so after two layers logits differ by
# a few such roundings of the logit scale.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
# torch compiles flex_attention and the decode step once per shape (dynamic=False) and, past
# torch._dynamo.config.recompile_limit shapes of one function (8), warns and runs it uncompiled:
# the speed measured would silently be another path's. `--config gpu` compiles 18 shapes of
# flex_attention on a GPU (3 per check config and dtype, 1 per dtype for PaliGemma 1's prefill,
# 4 for the 3B), `--config attention` 10.
RECOMPILE_LIMIT = 32


@dataclass(frozen=True)
class Plan:
    """What `--config gpu` measures on one device type."""

    checks: tuple[str, ...]  # check_cases checked, each in float32 and bfloat16
    decode_checked: tuple[torch.dtype, ...]  # the dtypes whose decoding is checked too
    prefill_only: tuple[str, ...]  # the checks whose decoding is not checked
    speed: str  # the bench case whose speed is measured
    decode_batches: tuple[int, ...]
    train: str  # the bench case of the full fine-tuning step
    train_batches: tuple[int, ...]  # tried largest first until one fits
    lora_batches: tuple[int, ...]  # the speed case with LoRA, likewise
    matmul_dtype: torch.dtype  # what the training steps compute in
    matmul_size: int
    ends_s: dict[str, float] | None  # part -> seconds from the start after which it starts nothing new


PLANS = {
    # 240 s in all: the ends leave 25 s for the measurement in flight and the report. Guessed
    # from compile times on a CPU (the checks compile 4 decode steps and 14 flex kernels, the
    # compiled decode one step per batch size), not yet measured on a GPU. PaliGemma 1 comes
    # last, so that it spends what time the checks have left and never costs PaliGemma 2's.
    "cuda": Plan(checks=("tiny", "full-width", "tiny-gemma1"), decode_checked=(torch.float32, torch.bfloat16),
                 prefill_only=("tiny-gemma1",), speed="3b-bf16", decode_batches=(1, 8, 32), train="small",
                 train_batches=(128, 64, 32), lora_batches=(64, 32, 16, 8), matmul_dtype=torch.bfloat16,
                 matmul_size=8192, ends_s={"checks": 70, "speed": 170, "train": 215}),
    # About a minute on one core: decoding checked in float32 only (each dtype compiles a decode
    # step and two flex kernels, 40 s on one core), and the decode batch is the checks'
    # (CHECK_BATCH), so the decode measured reuses the step they compiled. No time limit.
    "cpu": Plan(checks=("tiny", "tiny-gemma1"), decode_checked=(torch.float32,), prefill_only=("tiny-gemma1",),
                speed="tiny", decode_batches=(2,), train="tiny", train_batches=(8,),
                lora_batches=(8,), matmul_dtype=torch.float32, matmul_size=1024, ends_s=None),
}
CHECK_BATCH, SUFFIX, PADDING = 2, 4, 3  # the checks' padded batch (`padded_batch`)
PATHS = {"eager": ("eager", False), "sdpa": ("sdpa", False), "flex": ("flex", False),  # name: (attention,
         "compiled": ("flex", True),                                                 # decode(compile=...))
         # The compiler fuses eager attention's pointwise soft-cap, mask and softmax itself; on a
         # GPU this path does not depend on flex_attention compiling inside the step's graph.
         "compiled eager": ("eager", True)}


# ---------------------------------------------------------------------------------------------
# The report: every figure as it comes.

class Report:
    """Figures as they are measured: each printed at once (flushed) as one line, kept in a nested
    dict (the JSON), and the log and JSON files rewritten atomically after every one."""

    def __init__(self, kind: str, device: torch.device, command: str, ends_s: dict[str, float] | None):
        self.started = time.perf_counter()
        self.stem = OUT / f"{kind}-{device.type}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        self.ends_s = ends_s or {}
        self.lines: list[str] = []
        self.data = {"date": date.today().isoformat(), "command": command, "machine": machine(device)}

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started

    def may_start(self, part: str) -> bool:
        """Whether `part` may start another measurement: its time (Plan.ends_s) not yet spent."""
        return self.elapsed() < self.ends_s.get(part, float("inf"))

    def record(self, keys: tuple[str, ...], figures: dict, text: str) -> None:
        """Put `figures` at data[keys[0]][keys[1]]..., print and log `text` about them, save."""
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = figures
        self.say(f"{' / '.join(keys):<56} {text}")

    def say(self, text: str) -> None:
        """Print and log one line, stamped with the seconds since the start; save."""
        line = f"[{self.elapsed():6.1f} s] {text}"
        print(line, flush=True)
        self.lines.append(line)
        self.save()

    def save(self) -> None:
        """Rewrite the log and the JSON file (atomically: a killed run leaves whole files)."""
        atomic_write(self.stem.with_suffix(".log"), lambda f: f.write("\n".join(self.lines).encode() + b"\n"))
        atomic_write(self.stem.with_suffix(".json"), lambda f: f.write(json.dumps(self.data, indent=1).encode()))

    def run_part(self, part: str, keys: tuple[str, ...], measure: Callable[[], None]) -> None:
        """Run one measurement of `part` if its time allows, else record it as skipped; if it
        raises, record the error (the traceback goes to stderr) and go on."""
        if not self.may_start(part):
            self.record(keys, {"skipped": f"{part} had no time left ({self.ends_s[part]:.0f} s from the start)"},
                        "skipped: no time left")
            return
        try:
            measure()
        except Exception as err:  # noqa: BLE001 - one broken measurement must not cost the rest of the run
            traceback.print_exc(file=sys.stderr)
            why = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
            self.record(keys, {"failed": why}, f"failed: {why}")
        free_memory()


def free_memory() -> None:
    """Give back what the last measurement freed (on a GPU, the allocator's cached blocks too)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Part 1: the device.

def device_part(report: Report, plan: Plan, device: torch.device) -> None:
    """The copy bandwidth and the matmul FLOP/s of this device, measured."""
    figures = {"copy_bandwidth_gb_s": copy_bandwidth(device) / 1e9,
               "matmul_tflops": matmul_flops(device, plan.matmul_dtype, plan.matmul_size) / 1e12,
               "matmul": f"[{plan.matmul_size}]² {str(plan.matmul_dtype).removeprefix('torch.')}"}
    if device.type == "cuda":
        datasheet = peak_flops(device, None)
        figures["datasheet_tflops"] = None if datasheet is None else datasheet / 1e12
    report.record(("device",), figures, f"copy {figures['copy_bandwidth_gb_s']:.0f} GB/s, matmul {figures['matmul']} "
                                        f"{figures['matmul_tflops']:.1f} TFLOP/s")


def device_figure(report: Report, key: str) -> float | None:
    """A figure of part 1 (None if it failed)."""
    return report.data.get("device", {}).get(key)


# ---------------------------------------------------------------------------------------------
# Part 2: the checks.

def padded_batch(case: Case, device: torch.device) -> dict:
    """CHECK_BATCH random images and prompts of the case's decoding shape (bench.make_inputs),
    whose last SUFFIX tokens are causal steps and whose last row ends in PADDING tokens of
    padding. The decode measurement of the same case and batch then reuses what the checks
    compiled: compiled code depends on shapes, not on which tokens are causal or padding."""
    x = make_inputs(case, CHECK_BATCH, 0, device)
    x["mask_ar"] = x["mask_ar"].clone()  # make_inputs expands one row
    x["mask_ar"][:, -SUFFIX:] = 1
    x["mask_input"][-1, -PADDING:] = 0
    x["input_ids"][-1, -PADDING:] = PAD_ID
    return x


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |candidate - reference| / max |reference|, in float32."""
    reference, candidate = reference.float(), candidate.float()
    return ((candidate - reference).abs().max() / reference.abs().max()).item()


def check_row(report: Report, keys: tuple[str, ...], error: float, tolerance: float, extra: dict | None = None,
              agrees: bool = True) -> None:
    """Record one check: passed if the error is within the tolerance (and `agrees`)."""
    passed = error <= tolerance and agrees
    verdict = "ok" if passed else "FAILED"
    details = "" if extra is None else ", " + ", ".join(f"{k} {v}" for k, v in extra.items())
    report.record(keys, {"error": error, "tolerance": tolerance, "passed": passed, **(extra or {})},
                  f"error {error:.2e} (tolerance {tolerance:.0e}{details})  {verdict}")


def without_attention_softcap(model: PaliGemma) -> PaliGemma:
    """The same model (sharing its weights) with Gemma 2's attention soft-cap off, where sdpa applies."""
    cfg = model.config
    with torch.device("meta"):
        twin = PaliGemma(replace(cfg, text=replace(cfg.text, attn_softcap=None)))
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval()


@torch.inference_mode()
def prefill_checks(report: Report, keys: tuple[str, ...], model: PaliGemma, x: dict, tolerance: float) -> None:
    """Logits of the padded batch at its real tokens: flex against eager; sdpa against eager
    with the attention soft-cap off (with it, sdpa runs eager)."""
    real = x["mask_input"].bool()  # [B, T]; a padding query sees nothing, and flex gives it zeros

    def logits(m: PaliGemma, attention: str) -> torch.Tensor:
        return set_attention(m, attention)(x["pixel_values"], x["input_ids"], x["mask_ar"], x["mask_input"])[real]

    reference = logits(model, "eager")  # [n real, V]
    check_row(report, keys + ("prefill flex vs eager",), relative_error(reference, logits(model, "flex")), tolerance)
    uncapped = without_attention_softcap(model)
    reference = logits(uncapped, "eager")
    check_row(report, keys + ("prefill sdpa vs eager, no soft-cap",),
              relative_error(reference, logits(uncapped, "sdpa")), tolerance)
    set_attention(model, "eager")


def recording(seen: list[torch.Tensor], forced: torch.Tensor | None = None) -> Callable:
    """A sampler that keeps a float32 copy of each step's logits [B, V] and answers greedily, or
    with forced[:, step] (teacher forcing)."""
    def sampler(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.float().clone())  # a copy: a CUDA graph's output is overwritten by the next step
        return greedy(logits) if forced is None else forced[:, len(seen) - 1]
    return sampler


def decode_checks(report: Report, keys: tuple[str, ...], model: PaliGemma, x: dict, new_tokens: int,
                  tolerance: float) -> None:
    """decode on flex (uncompiled, a static cache), then the compiled decode (PATHS), against
    decode on eager, teacher-forced on the reference's greedy tokens: the logits of every step,
    and the greedy choices wherever the reference's margin between its two best logits exceeds
    twice the tolerated error."""
    prompt = (x["pixel_values"], x["input_ids"], x["mask_ar"], x["mask_input"])
    seen = []
    tokens = decode(set_attention(model, "eager"), *prompt, new_tokens, sampler=recording(seen),
                    eos_id=NO_EOS)  # [B, new_tokens]
    reference = torch.stack(seen, 1)  # [B, new_tokens, V]
    top2 = reference.topk(2, dim=-1).values  # [B, new_tokens, 2]
    decided = top2[..., 0] - top2[..., 1] > 2 * tolerance * reference.abs().max()  # [B, new_tokens]
    for path in ("flex", "compiled"):
        attention, compiled = PATHS[path]
        seen = []
        decode(set_attention(model, attention), *prompt, new_tokens, sampler=recording(seen, tokens),
               eos_id=NO_EOS, compile=compiled)
        fast = torch.stack(seen, 1)  # [B, new_tokens, V]
        agree = (fast.argmax(-1) == tokens)[decided].all().item()
        check_row(report, keys + (f"decode {path} ({attention} attention) vs eager",),
                  relative_error(reference, fast), tolerance,
                  {"greedy_agree": agree, "steps_decided": f"{int(decided.sum())}/{decided.numel()}"}, agree)
    set_attention(model, "eager")


def check_cases(device: torch.device) -> dict[str, Case]:
    """What the checks may run: bench.cases, and PaliGemma 1 at toy width, which the bench does
    not time but whose decoder (no soft-caps, multi-query attention) the checks should cover."""
    gemma1 = Case("every PaliGemma 1 mechanism at toy width, 2 layers per tower", get_config("tiny-gemma1"),
                  torch.float32)
    return {**cases(device), "tiny-gemma1": gemma1}


def check_config(report: Report, name: str, plan: Plan, device: torch.device) -> None:
    """Every check of check case `name`, in float32 and then bfloat16 (the same weights, rounded);
    the decoding ones in the plan's `decode_checked` dtypes, unless the plan checks its prefill only."""
    case = check_cases(device)[name]
    model = random_model(case.model, torch.float32, device).eval()
    x = padded_batch(case, device)
    for dtype in (torch.float32, torch.bfloat16):
        keys = ("checks", f"{name} {str(dtype).removeprefix('torch.')}")
        typed = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        xd = {**x, "pixel_values": x["pixel_values"].to(dtype)}
        report.run_part("checks", keys + ("prefill",), lambda: prefill_checks(report, keys, typed, xd, TOLERANCE[dtype]))
        if dtype in plan.decode_checked and name not in plan.prefill_only:
            report.run_part("checks", keys + ("decode",),
                            lambda: decode_checks(report, keys, typed, xd, case.new_tokens, TOLERANCE[dtype]))


# ---------------------------------------------------------------------------------------------
# Part 3: speed. `measure_path` serves `--config attention` too.

def cold_then_steady(run: Callable[[], float], device: torch.device, repeats: int) -> tuple[float, float]:
    """Call `run` (it returns its own figure: ms, tokens/s) once cold, then `repeats` times;
    return the median figure of the steady calls and how many seconds longer the cold call took
    than a steady one (compiling, recording CUDA graphs, the allocator's first requests)."""
    cold = timed(run, device)
    figures: list[float] = []
    seconds = [timed(lambda: figures.append(run()), device) for _ in range(repeats)]
    return statistics.median(figures), max(0.0, cold - statistics.median(seconds))


def decode_row(report: Report, keys: tuple[str, ...], model: PaliGemma, case: Case, batch: int,
               run: Callable[[], float], device: torch.device, bandwidth: float | None, about: dict) -> None:
    """Time one decode (`run` returns its tokens/s) and record tokens/s, compile time and, with
    the bandwidth, MBU: bytes one step must read (the context half-way through the answer)
    x steps/s / bandwidth; `about` ({"attention": ...}) goes with them."""
    tokens_per_s, compile_s = cold_then_steady(run, device, case.repeats)
    context = case.model.num_image_tokens + case.prompt_len + case.new_tokens // 2
    step_bytes = decode_step_bytes(model, batch, context)
    figures = {"tok_s": tokens_per_s, "compile_s": compile_s, "step_bytes": step_bytes, **about}
    text = (f"[{about['attention']} attention] " if "attention" in about else "") + f"{tokens_per_s:.1f} tokens/s"
    if bandwidth:
        figures["mbu"] = step_bytes * tokens_per_s / batch / bandwidth
        text += f", MBU {figures['mbu']:.1%}"
    report.record(keys, figures, f"{text}, compile {compile_s:.1f} s")


def measure_path(report: Report, part: str, keys: tuple[str, ...], case: Case, model: PaliGemma,
                 device: torch.device, path: str, batches: tuple[int, ...], with_prefill: bool,
                 bandwidth: float | None = None) -> None:
    """Ours on one path of PATHS: prefill ms at batch 1 (if with_prefill) under
    keys + ("prefill_ms", "ours PATH"), then decode tokens/s at each batch under
    keys + ("decode", "ours PATH", "bB"), each recorded as it is measured."""
    attention, compiled = PATHS[path]
    runs = attention_implementation(set_attention(model, attention).config.text)  # "sdpa" may run eager
    label, runs_text = f"ours {path}", f"[{runs} attention] "
    if with_prefill:
        x = make_inputs(case, 1, 0, device)

        def one_prefill() -> float:
            cache = new_cache(model, x["pixel_values"], case.prompt_len, case.new_tokens)
            return 1e3 * timed(lambda: prefill(model, x["pixel_values"], x["input_ids"], x["mask_ar"],
                                               x["mask_input"], cache), device)

        def prefill_row():
            ms, compile_s = cold_then_steady(one_prefill, device, case.repeats)
            report.record(keys + ("prefill_ms", label), {"ms": ms, "compile_s": compile_s, "attention": runs},
                          f"{runs_text}{ms:.1f} ms, compile {compile_s:.1f} s")

        report.run_part(part, keys + ("prefill_ms", label), prefill_row)
    for batch in batches:
        x = make_inputs(case, batch, 0, device, seed=batch)

        def run() -> float:
            clock = TokenClock()
            decode(model, x["pixel_values"], x["input_ids"], x["mask_ar"], x["mask_input"], case.new_tokens,
                   eos_id=NO_EOS, on_token=clock.on_token, compile=compiled)
            return clock.tokens_per_second(batch)

        row = keys + ("decode", label, f"b{batch}")
        report.run_part(part, row, lambda: decode_row(report, row, model, case, batch, run, device, bandwidth,
                                                      {"attention": runs}))


def transformers_options(device: torch.device, static: bool) -> dict:
    """generate's options: none (eager, its dynamic cache), or its static cache, which generate
    compiles itself on a GPU and, through transformers' own switch for it, on a CPU."""
    if not static:
        return {}
    from transformers import CompileConfig
    options = {"cache_implementation": "static"}
    if device.type != "cuda":
        config = CompileConfig(mode="default")  # no CUDA graphs on a CPU
        config._compile_all_devices = True
        options["compile_config"] = config
    return options


def transformers_row(report: Report, case: Case, reference, ours: PaliGemma, device: torch.device, batch: int,
                      static: bool, bandwidth: float | None) -> None:
    """transformers' generate at one batch size, eager or with its compiled static cache."""
    x = make_inputs(case, batch, 0, device, seed=batch)
    options = transformers_options(device, static)

    def run() -> float:
        clock = TokenClock()
        with torch.no_grad():
            reference.generate(**x["hf"], do_sample=False, max_new_tokens=case.new_tokens, eos_token_id=None,
                               pad_token_id=0, streamer=clock, **options)
        return clock.tokens_per_second(batch)

    row = ("decode", "transformers static+compile" if static else "transformers eager", f"b{batch}")
    report.run_part("speed", row, lambda: decode_row(report, row, ours, case, batch, run, device, bandwidth, {}))


def speed_part(report: Report, plan: Plan, device: torch.device) -> None:
    """Prefill and decode of the speed case: ours eager, flex and compiled; transformers eager
    and compiled. One set of weights: transformers initialises them (on the device), ours loads them."""
    case = cases(device)[plan.speed]
    started = time.perf_counter()
    with torch.device(device):  # transformers initialises its weights where it is built
        reference, ours = build_pair(case, device)
    report.record(("speed",), {"about": case.about, "dtype": str(case.dtype).removeprefix("torch."),
                               "prompt_tokens": case.model.num_image_tokens + case.prompt_len,
                               "new_tokens": case.new_tokens, "repeats": case.repeats,
                               "weight_gb": sum(p.numel() * p.element_size() for p in ours.parameters()) / 1e9,
                               "build_s": time.perf_counter() - started},
                  f"{case.about}, {str(case.dtype).removeprefix('torch.')}: built in "
                  f"{time.perf_counter() - started:.0f} s")
    gb_s = device_figure(report, "copy_bandwidth_gb_s")
    bandwidth = None if gb_s is None else gb_s * 1e9  # bytes/s
    measure_path(report, "speed", (), case, ours, device, "eager", (), with_prefill=True)
    measure_path(report, "speed", (), case, ours, device, "flex", (), with_prefill=True)
    x = make_inputs(case, 1, 0, device)

    def reference_prefill() -> float:
        with torch.no_grad():
            return 1e3 * timed(lambda: reference(**x["hf"], use_cache=True, logits_to_keep=1), device)

    def reference_prefill_row():
        ms, compile_s = cold_then_steady(reference_prefill, device, case.repeats)
        report.record(("prefill_ms", "transformers eager"), {"ms": ms, "compile_s": compile_s}, f"{ms:.1f} ms")

    report.run_part("speed", ("prefill_ms", "transformers eager"), reference_prefill_row)
    for batch in plan.decode_batches:
        measure_path(report, "speed", (), case, ours, device, "eager", (batch,), False, bandwidth)
        transformers_row(report, case, reference, ours, device, batch, False, bandwidth)
        measure_path(report, "speed", (), case, ours, device, "compiled", (batch,), False, bandwidth)
        measure_path(report, "speed", (), case, ours, device, "compiled eager", (batch,), False, bandwidth)
        transformers_row(report, case, reference, ours, device, batch, True, bandwidth)


# ---------------------------------------------------------------------------------------------
# Part 4: training steps.

def largest_fitting(batches: tuple[int, ...], make_step: Callable[[int], Callable[[], None]],
                    params: list[torch.Tensor]) -> tuple[int, Callable[[], None], list[int]]:
    """The first of `batches` (largest first) whose training step runs without running out of
    device memory, its step (run once, so the optimizer state exists), and the batches that did
    not fit. A batch that does not fit costs one failed step, whose memory is freed before the
    next try; if none fits, the last OutOfMemoryError is raised."""
    too_big, step = [], None
    for batch in batches:
        try:
            step = make_step(batch)  # its inputs may not fit either
            step()
            return batch, step, too_big
        except torch.cuda.OutOfMemoryError:
            if batch == batches[-1]:
                raise
        too_big.append(batch)
        step = None
        for p in params:
            p.grad = None
        free_memory()
    raise ValueError("largest_fitting needs at least one batch size")


def train_row(report: Report, keys: tuple[str, ...], case: Case, model: PaliGemma, batches: tuple[int, ...],
              device: torch.device, flops_of: Callable[[PaliGemma, int, int], float], autocast: bool) -> None:
    """One training step (forward, the suffix loss, backward, clipping, AdamW on what requires
    gradients) at the largest batch that fits: step time, tokens/s, peak memory and MFU."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    image_tokens, text_len = case.model.num_image_tokens, case.prompt_len + case.suffix_len

    def make_step(batch: int) -> Callable[[], None]:
        inputs = make_inputs(case, batch, case.suffix_len, device, seed=1)
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            paligemma_step_loss(model, inputs, image_tokens, autocast)[0].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        return step

    batch, step, too_big = largest_fitting(batches, make_step, params)
    seconds, _ = cold_then_steady(lambda: timed(step, device), device, case.repeats)
    flops = flops_of(model, batch, text_len)
    peak = device_figure(report, "matmul_tflops")
    figures = {"batch": batch, "did_not_fit": too_big, "step_ms": seconds * 1e3,
               "tokens_per_s": batch * (image_tokens + text_len) / seconds, "model_tflop": flops / 1e12,
               "peak_mib_step": peak_memory_mib(step, device), "trainable": sum(p.numel() for p in params)}
    text = f"batch {batch}: {seconds * 1e3:.0f} ms, {figures['tokens_per_s']:.0f} tokens/s"
    if peak:
        figures["mfu"] = flops / seconds / (peak * 1e12)
        text += f", MFU {figures['mfu']:.1%}"
    report.record(keys, figures, text + (f" (did not fit: {too_big})" if too_big else ""))


def train_part(report: Report, plan: Plan, device: torch.device) -> None:
    """Full fine-tuning of the train case, then LoRA (stage 3's preparation) on the speed case."""
    full = cases(device)[plan.train]
    report.run_part("train", ("train", plan.train), lambda: train_row(
        report, ("train", plan.train), full, random_model(full.model, torch.float32, device), plan.train_batches,
        device, train_flops, full.autocast))
    lora = cases(device)[plan.speed]
    keys = ("train", f"{plan.speed} lora")
    report.run_part("train", keys, lambda: train_row(
        report, keys, lora, Transfer("lora").prepare(random_model(lora.model, lora.dtype, device), device),
        plan.lora_batches, device, lora_train_flops, device.type == "cuda"))


# ---------------------------------------------------------------------------------------------
# The commands.

@contextmanager
def bench_settings(threads: int | None):
    """Run the block with torch using `threads` CPU threads (None: as it is) and compiling up to
    RECOMPILE_LIMIT shapes of one function; restore both after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            yield
    finally:
        torch.set_num_threads(before)


def gpu_bench(device: str = "cuda", threads: int | None = None, command: str = "") -> dict:
    """`--config gpu`: the four parts of the module docstring on `device` ("cuda", or "cpu" at
    tiny sizes), torch using `threads` CPU threads (default: its own choice); print each row as
    measured, then a table and the JSON line; return the report."""
    device = torch.device(device)
    if device.type not in PLANS:
        raise BadInput(f"--config gpu runs on {' or '.join(PLANS)}, not {device.type}")
    plan = PLANS[device.type]
    with bench_settings(threads):
        report = Report("gpu", device, command, plan.ends_s)
        report.data["plan"] = json.loads(json.dumps(asdict(plan), default=lambda dtype: str(dtype).removeprefix("torch.")))
        report.say(f"bench --config gpu on {where(report.data['machine'])}; log and JSON: {report.stem}.*")
        report.run_part("device", ("device",), lambda: device_part(report, plan, device))
        for name in plan.checks:
            report.run_part("checks", ("checks", name), lambda: check_config(report, name, plan, device))
        report.run_part("speed", ("speed",), lambda: speed_part(report, plan, device))
        train_part(report, plan, device)
        return finish(report)


def attention_bench(device: str = "cpu", threads: int | None = None, command: str = "") -> dict:
    """`--config attention`: prefill and decode of the tiny and full-width configs on every
    attention path (module docstring), torch using `threads` CPU threads; print each row as
    measured, then a table and the JSON line; return the report."""
    device = torch.device(device)
    with bench_settings(threads):
        report = Report("attention", device, command, None)
        report.say(f"bench --config attention on {where(report.data['machine'])}; log and JSON: {report.stem}.*")
        for name in ("tiny", "full-width"):
            case = cases(device)[name]

            def measure_config():
                model = random_model(case.model, case.dtype, device).eval()
                report.record((name,), {"about": case.about, "dtype": str(case.dtype).removeprefix("torch."),
                                        "prompt_tokens": case.model.num_image_tokens + case.prompt_len,
                                        "new_tokens": case.new_tokens, "repeats": case.repeats}, case.about)
                for path, (_, compiled) in PATHS.items():  # a compiled decode prefills uncompiled: no new prefill
                    measure_path(report, "attention", (name,), case, model, device, path, (1, 8), not compiled)

            report.run_part("attention", (name,), measure_config)
        return finish(report)


def where(info: dict) -> str:
    """The device of bench.machine's description, in a few words."""
    return info.get("gpu") or f"{info.get('cpu', 'CPU')}, {info['threads']} threads"


def finish(report: Report) -> dict:
    """Save the report, print the table, then the JSON line (last); return the report."""
    report.data["elapsed_s"] = report.elapsed()
    report.save()
    print(table(report.data))
    print(json.dumps(report.data), flush=True)
    return report.data


# ---------------------------------------------------------------------------------------------
# The table.

def outcome(figures: dict, text: Callable[[dict], str]) -> str:
    """A row's text, or why it has none (failed, skipped)."""
    for why in ("failed", "skipped"):
        if why in figures:
            return f"{why}: {figures[why]}"
    return text(figures)


def speed_lines(data: dict, indent: str = "") -> list[str]:
    """The prefill and decode rows of one speed measurement (`measure_path`'s keys)."""
    lines = []
    runs = lambda f: f"  ({f['attention']} attention)" if "attention" in f else ""  # noqa: E731
    for who, f in data.get("prefill_ms", {}).items():
        lines.append(f"{indent}prefill b1  {who:<30} " + outcome(f, lambda f: (
            f"{f['ms']:10.1f} ms  compile {f['compile_s']:5.1f} s" + runs(f))))
    for who, by_batch in data.get("decode", {}).items():
        for batch, f in by_batch.items():
            lines.append(f"{indent}decode {batch:<4} {who:<30} " + outcome(f, lambda f: (
                f"{f['tok_s']:10.1f} tokens/s  compile {f['compile_s']:5.1f} s"
                + (f"  MBU {f['mbu']:6.1%}" if "mbu" in f else "") + runs(f))))
    return lines


def table(data: dict) -> str:
    """The human-readable report of either command."""
    lines = [f"minipaligemma bench, {data['date']}, on {where(data['machine'])}, torch {data['machine']['torch']}, "
             f"transformers {data['machine']['transformers']}; {data['elapsed_s']:.0f} s", ""]
    if "device" in data:
        lines.append("device      " + outcome(data["device"], lambda f: (
            f"copy bandwidth {f['copy_bandwidth_gb_s']:.0f} GB/s; matmul {f['matmul']} {f['matmul_tflops']:.1f} "
            f"TFLOP/s" + (f" (datasheet {f['datasheet_tflops']:.0f})" if f.get("datasheet_tflops") else ""))))
    for group, rows in data.get("checks", {}).items():  # "tiny float32": {check: figures}
        if "failed" in rows or "skipped" in rows:  # the whole config
            lines.append(f"check {group:<22} " + outcome(rows, str))
            continue
        for name, f in rows.items():
            lines.append(f"check {group:<22} {name:<38} " + outcome(f, lambda f: (
                f"{f['error']:.1e} (tol {f['tolerance']:.0e})  {'ok' if f['passed'] else 'FAILED'}")))
    if "speed" in data:
        lines.append("speed       " + outcome(data["speed"], lambda f: (
            f"{f['about']}, {f['dtype']}, {f['prompt_tokens']} prompt tokens, {f['new_tokens']} new, "
            f"median of {f['repeats']} after a cold call")))
    lines += speed_lines(data)
    for name, f in data.get("train", {}).items():
        lines.append(f"train {name:<22} " + outcome(f, lambda f: (
            f"batch {f['batch']}: {f['step_ms']:.0f} ms, {f['tokens_per_s']:.0f} tokens/s"
            + (f", MFU {f['mfu']:.1%}" if "mfu" in f else "") + f", peak +{f['peak_mib_step']:.0f} MiB"
            + (f" (did not fit: {f['did_not_fit']})" if f["did_not_fit"] else ""))))
    for name in ("tiny", "full-width"):  # --config attention
        if name in data:
            lines.append(f"{name}: " + outcome(data[name], lambda f: f"{f['about']}, {f['dtype']}"))
            lines += speed_lines(data[name], "  ")
    return "\n".join(lines)
