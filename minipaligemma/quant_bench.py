"""The quantized bench: PaliGemma 2 3B-224 at full depth in float32, bfloat16, int8 and int4,
and transformers, decoding side by side in one run, against the memory bandwidth floor.

    python -m minipaligemma bench --config quantized               # the 3B, about 10 min on a CPU
    python -m minipaligemma bench --config quantized --size tiny   # the same code in seconds

It prints a table and, as its last line, one JSON object holding every number (as bench.py).

Design choices:
- One model in memory at a time. A 3B model is 6 GB in bfloat16 and 12 GB in float32, so each
  variant is built, measured and freed before the next. Ours is built on the meta device in its
  final dtype and then filled with random numbers (`measure.random_model`), so no float32 copy of a
  bfloat16 model ever exists; every variant of ours gets the same weights (drawn in float32,
  rounded to the variant's dtype), so the greedy tokens of int8 and int4 can be compared with
  float32's. transformers initialises its own random weights (the same shapes; speed does not
  depend on the values) in the dtype it is fastest with.
- Variants cannot take turns (two 3B models do not fit), so each one's runs come one after the
  other; the table gives the spread (lowest and highest of the timed runs) beside the median.
- The dtypes are measured, not assumed: a probe times one decoder MLP matrix times one token
  in float32 and bfloat16, plain and on each fused kernel of quantize.py. int8, int4 and
  transformers then run in whichever input dtype made their matrix-vector product fastest.
- What is timed (measure.py's helpers; one warm-up run, then `repeats`):
    prefill  image + prompt into an empty KV cache at batch 1 (as bench.py).
    decode   greedy steps after a prefill. Ours: the cache of one prefill, its row repeated to
             batch 1 or 8 (`PaliGemmaCache.select_rows`), then `new_tokens` steps of
             `generate.extend`, so a batch-8 decode does not pay a batch-8 prefill each time.
             transformers: `generate` with its streamer on the token clock (which times the
             steps alone, not its prefill).
- The floor: a decode step must read every decoder weight (codes and scales when quantized;
  the output embedding whole) and the KV cache (measure.decode_step_bytes). At the bandwidth of
  a large tensor copy measured in the same run, batch B cannot decode faster than
  B * bandwidth / bytes per step; "of floor" is the measured tokens/s over that.
- Peak RSS is the process's resident-set peak over a variant's whole life (build, quantize,
  measure), read from Linux's VmHWM after resetting it.

`held_out_quality` gives the other side of the trade: every held-out metric of a trained tiny
run, in float32 and quantized.
"""

import copy
import gc
import json
import statistics
import time
from datetime import date
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .bench import Case, build_reference, log, machine, make_inputs
from .checkpoint import load
from .config import get_config
from .data import World
from .evaluate import evaluate
from .generate import extend, greedy, new_cache, prefill
from .measure import (TokenClock, copy_bandwidth, decode_step_bytes, peak_memory_mib, proc_kib, random_model,
                      take_turns, timed)
from .paligemma import PaliGemma
from .quantize import QuantizedLinear, in_words, quantize_model, state_bytes
from .tasks import mask_to_target
from .train import RECIPES
from .vqvae import load_vqvae

SIZES = {"3b": "paligemma2-3b-224", "tiny": "tiny"}
GROUP_SIZE = 64  # int4 inputs per scale


def quantized_case(size: str) -> Case:
    """The model and workload of the quantized bench at `size` ("3b" or "tiny")."""
    model = get_config(SIZES[size])
    if size == "3b":
        return Case("PaliGemma 2 3B-224 at full depth", model, torch.bfloat16, new_tokens=8, train_batch=None,
                    repeats=2)
    return Case("every PaliGemma 2 mechanism at toy width, 2 layers per tower", model, torch.float32,
                new_tokens=8, train_batch=None, repeats=2)


# ---------------------------------------------------------------------------------------------
# Building the variants.

# ---------------------------------------------------------------------------------------------
# The kernel probe.

def probe_kernels(case: Case, repeats: int = 20) -> dict[str, float]:
    """Milliseconds of one decoder MLP matrix [mlp_dim, width] times one token, by weights and
    input dtype: "float32", "bfloat16", and "int8 <dtype>", "int4 <dtype>" on the fused kernels."""
    width, hidden = case.model.text.width, case.model.text.mlp_dim
    x = torch.randn(1, width)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        linear = nn.Linear(width, hidden, bias=False, dtype=dtype)  # its own random init: speed does not depend on it
        layers = {name: linear, **{f"{scheme} {name}": QuantizedLinear.from_linear(linear, scheme, GROUP_SIZE, "cpu")
                                   for scheme in ("int8", "int4")}}
        for label, layer in layers.items():
            xd = x.to(dtype)
            with torch.inference_mode():
                seconds = take_turns({label: lambda: timed(lambda: layer(xd), torch.device("cpu"))}, repeats)
            results[label] = seconds[label] * 1e3
    return results


def fastest_input_dtype(probe: dict[str, float], scheme: str | None) -> torch.dtype:
    """The input dtype that made the probe's matrix-vector product fastest for `scheme` (None: plain)."""
    prefix = f"{scheme} " if scheme else ""
    return min((torch.float32, torch.bfloat16), key=lambda d: probe[prefix + str(d).removeprefix("torch.")])


# ---------------------------------------------------------------------------------------------
# Measuring one variant.

def _spread(values: list[float]) -> dict:
    """Median, lowest and highest of the timed runs (the warm-up, first, left out)."""
    timed_runs = values[1:]
    return {"median": statistics.median(timed_runs), "low": min(timed_runs), "high": max(timed_runs)}


def measure_ours(case: Case, model: PaliGemma, repeats: int) -> dict:
    """Prefill ms, decode tokens/s at each batch size, and the batch-1 greedy tokens of ours."""
    x = make_inputs(case, 1, 0, torch.device("cpu"))
    runs = {"prefill_ms": []}
    prefilled = {}

    def run_prefill() -> float:
        cache = new_cache(model, x["pixel_values"], case.prompt_len, case.new_tokens)
        seconds = timed(lambda: prefilled.update(
            logits=prefill(model, x["pixel_values"], x["input_ids"], x["mask_ar"], x["mask_input"], cache)),
            torch.device("cpu"))
        prefilled["cache"] = cache
        runs["prefill_ms"].append(seconds * 1e3)
        return seconds

    take_turns({"prefill": run_prefill}, repeats)
    figures = {"prefill_ms": _spread(runs["prefill_ms"])}
    for batch in (1, 8):
        speeds, tokens = [], []

        def run_decode() -> float:
            cache = copy.deepcopy(prefilled["cache"])
            cache.select_rows(torch.zeros(batch, dtype=torch.long))  # the prefilled row, batch times
            logits = prefilled["logits"].expand(batch, -1)  # [B, V]
            clock, steps = TokenClock(), []
            for step in range(case.new_tokens):
                next_tokens = greedy(logits)  # [B]
                steps.append(next_tokens)
                clock.on_token(0, int(next_tokens[0]))
                if step < case.new_tokens - 1:
                    logits = extend(model, next_tokens, cache)  # [B, V]
            tokens.append(torch.stack(steps, dim=1))  # [B, new_tokens]
            speeds.append(clock.tokens_per_second(batch))
            return speeds[-1]

        take_turns({"decode": run_decode}, repeats)
        figures[f"decode_b{batch}_tok_s"] = _spread(speeds)
        if batch == 1:
            figures["tokens"] = tokens[-1][0].tolist()
    return figures


def measure_transformers(case: Case, reference, repeats: int) -> dict:
    """Prefill ms and decode tokens/s at each batch size of transformers' model (as bench.py)."""
    figures = {}
    x = make_inputs(case, 1, 0, torch.device("cpu"))
    times = []

    def run_prefill() -> float:
        with torch.no_grad():
            times.append(timed(lambda: reference(**x["hf"], use_cache=True, logits_to_keep=1), torch.device("cpu")))
        return times[-1]

    take_turns({"prefill": run_prefill}, repeats)
    figures["prefill_ms"] = _spread([t * 1e3 for t in times])
    for batch in (1, 8):
        xb, speeds = make_inputs(case, batch, 0, torch.device("cpu")), []

        def run_decode() -> float:
            clock = TokenClock()
            with torch.no_grad():
                reference.generate(**xb["hf"], do_sample=False, max_new_tokens=case.new_tokens,
                                   eos_token_id=None, pad_token_id=0, streamer=clock)
            speeds.append(clock.tokens_per_second(batch))
            return speeds[-1]

        take_turns({"decode": run_decode}, repeats)
        figures[f"decode_b{batch}_tok_s"] = _spread(speeds)
    return figures


def run_variant(case: Case, who: str, dtype: torch.dtype, scheme: str | None, repeats: int) -> dict:
    """Build one variant, measure it, free it: its figures, weight bytes, bytes per decode step and peak RSS."""
    result = {"who": who, "dtype": str(dtype).removeprefix("torch."),
              "weights": in_words(scheme, GROUP_SIZE) if scheme else "float",
              "kernel": "fused CPU kernel" if scheme else "plain"}
    name = f"{who} {result['dtype']}" + (f" {scheme}" if scheme else "")
    context = case.model.num_image_tokens + case.prompt_len + case.new_tokens // 2  # on average over the steps

    def build_and_measure():
        started = time.perf_counter()
        log(f"{name}: building")
        if who == "transformers":
            model = build_reference(case, dtype, torch.device("cpu"))
        else:
            model = random_model(case.model, dtype).eval()
            if scheme:
                quantize_model(model, scheme, GROUP_SIZE, kernel="cpu")
        result["build_s"] = time.perf_counter() - started
        log(f"{name}: measuring")
        if who == "transformers":
            result.update(measure_transformers(case, model, repeats))
            result["weight_bytes"] = state_bytes(model)
        else:
            result.update(measure_ours(case, model, repeats))
            result["weight_bytes"] = state_bytes(model)
            result["step_bytes_b1"] = decode_step_bytes(model, 1, context)
            result["step_bytes_b8"] = decode_step_bytes(model, 8, context)
        del model

    gc.collect()
    rss_before = proc_kib("/proc/self/status", "VmRSS") / 1024
    added = peak_memory_mib(build_and_measure, torch.device("cpu"))
    gc.collect()
    result["rss_before_mib"] = rss_before
    result["peak_rss_mib"] = None if added is None else rss_before + added
    # Each variant's figures as soon as they are measured: a run stopped before the table (a
    # 3B bench takes most of an hour) keeps what it measured.
    rss = "n/a" if added is None else f"{result['peak_rss_mib'] / 1024:.1f} GiB"
    log(f"{name}: prefill {result['prefill_ms']['median']:.0f} ms, decode b1 "
        f"{result['decode_b1_tok_s']['median']:.2f} tok/s, b8 {result['decode_b8_tok_s']['median']:.2f} tok/s, "
        f"peak RSS {rss}")
    return result


# ---------------------------------------------------------------------------------------------
# The whole bench.

def quantized_bench(size: str = "3b", repeats: int | None = None, threads: int | None = None,
                    command: str = "") -> dict:
    """Every variant of the quantized bench at `size`: print the table, then the JSON line;
    return the report."""
    case = quantized_case(size)
    repeats = repeats or case.repeats
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or threads_before)
    try:
        report = {"date": date.today().isoformat(), "command": command, "machine": machine(torch.device("cpu")),
                  "about": case.about, "prompt_tokens": case.model.num_image_tokens + case.prompt_len,
                  "new_tokens": case.new_tokens, "repeats": repeats, "group_size": GROUP_SIZE}
        log("probing the kernels on one MLP matrix")
        report["probe_ms"] = probe_kernels(case)
        report["copy_bandwidth_gb_s"] = copy_bandwidth(torch.device("cpu")) / 1e9
        probe_ms = report["probe_ms"]
        variants = [("ours", torch.float32, None), ("ours", torch.bfloat16, None),
                    ("ours", fastest_input_dtype(probe_ms, "int8"), "int8"),
                    ("ours", fastest_input_dtype(probe_ms, "int4"), "int4"),
                    ("transformers", fastest_input_dtype(probe_ms, None), None)]
        report["variants"] = [run_variant(case, *variant, repeats) for variant in variants]
        add_derived(report)
    finally:
        torch.set_num_threads(threads_before)
    print(table(report))
    print(json.dumps(report), flush=True)
    return report


def add_derived(report: dict) -> None:
    """Per variant: the bandwidth floor and the fraction of it reached, the ratios against
    transformers, and the greedy tokens' agreement with ours in float32."""
    bandwidth = report["copy_bandwidth_gb_s"] * 1e9
    variants = report["variants"]
    reference = next(v for v in variants if v["who"] == "transformers")
    float32 = variants[0]["tokens"]
    for v in variants:
        for batch in (1, 8):
            key = f"decode_b{batch}_tok_s"
            if v["who"] == "ours":
                floor = batch * bandwidth / v[f"step_bytes_b{batch}"]
                v[f"floor_b{batch}_tok_s"] = floor
                v[f"of_floor_b{batch}"] = v[key]["median"] / floor
            v[f"vs_transformers_b{batch}"] = v[key]["median"] / reference[key]["median"]
        v["prefill_vs_transformers"] = reference["prefill_ms"]["median"] / v["prefill_ms"]["median"]
        if v["who"] == "ours":
            v["greedy_agree_float32"] = sum(a == b for a, b in zip(v["tokens"], float32)) / len(float32)


def table(report: dict) -> str:
    """The human-readable report: the probe, then one row per variant."""
    m = report["machine"]
    lines = [f"minipaligemma quantized bench, {report['date']}: {report['about']}, {report['prompt_tokens']} "
             f"prompt tokens, {report['new_tokens']} new, median of {report['repeats']} (low-high); "
             f"transformers {m['transformers']}, torch {m['torch']}, {m.get('cpu', 'CPU')}, {m['threads']} threads",
             "probe, one MLP matrix x one token (ms): "
             + ", ".join(f"{k} {v:.2f}" for k, v in report["probe_ms"].items()),
             f"copy bandwidth {report['copy_bandwidth_gb_s']:.1f} GB/s; x tf = ratio to transformers (above 1: "
             "faster); floor = the bandwidth's tokens/s for the bytes a step reads", ""]
    fmt = "{:<48} {:>6} {:>16} {:>7} {:>18} {:>7} {:>6} {:>18} {:>7} {:>6} {:>8} {:>6}"
    lines.append(fmt.format("variant", "GB", "prefill ms", "x tf", "decode b1 tok/s", "x tf", "floor",
                            "decode b8 tok/s", "x tf", "floor", "RSS GiB", "agree"))
    for v in report["variants"]:
        spread = lambda f, n: f"{f['median']:.{n}f} ({f['low']:.{n}f}-{f['high']:.{n}f})"  # noqa: E731
        percent = lambda key: f"{v[key]:.0%}" if key in v else ""  # noqa: E731
        rss = "n/a" if v["peak_rss_mib"] is None else f"{v['peak_rss_mib'] / 1024:.1f}"
        lines.append(fmt.format(f"{v['who']} {v['dtype']}, {v['weights']}", f"{v['weight_bytes'] / 1e9:.2f}",
                                spread(v["prefill_ms"], 0), f"{v['prefill_vs_transformers']:.2f}",
                                spread(v["decode_b1_tok_s"], 2), f"{v['vs_transformers_b1']:.2f}",
                                percent("of_floor_b1"), spread(v["decode_b8_tok_s"], 2),
                                f"{v['vs_transformers_b8']:.2f}", percent("of_floor_b8"), rss,
                                percent("greedy_agree_float32")))
    lines.append("agree = share of batch-1 greedy tokens equal to ours in float32 (same weights)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Quality on a trained model.

def held_out_quality(run, stage: int, schemes=("int8", "int4"), group_size: int = 64, recipe="tiny",
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Every held-out metric of a trained run's stage, for its float32 model and for each
    scheme quantized from it: {"float32": {task: metric}, "int8": {...}, ...}.

    The evaluation is the trainer's (evaluate.py): the stage's model from `run`/stageN/model,
    the world of `seed` and the run's VQ-VAE, the recipe's number of held-out scenes at the
    model's resolution, so the float32 row is the stage's metrics.json. `recipe` is a name or
    a train.Recipe. The quantized layers run the reference path.
    """
    run = Path(run)
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    model = load(run / f"stage{stage}" / "model", dtype=torch.float32)
    vqvae = load_vqvae(run / "stage0" / "vqvae.safetensors")
    world = World(seed, recipe.world, segment_target=partial(mask_to_target, vqvae=vqvae))
    size = model.config.vision.image_size

    def metrics(m: nn.Module) -> dict[str, float]:
        return evaluate(m, model.tokenizer, world, size, recipe.eval_examples, vqvae)
    results = {"float32": metrics(model)}
    for scheme in schemes:
        results[scheme] = metrics(quantize_model(copy.deepcopy(model), scheme, group_size))
    return results
