"""Benchmarks: ours and transformers on the same weights and the same inputs, side by side.

    python -m minipaligemma bench --config tiny        # seconds; what CI runs
    python -m minipaligemma bench --config all         # a CPU: tiny, full-width, 3b-bf16 (about 15 min)
    python -m minipaligemma bench --config all --device cuda

It prints a table and, as its last line, one JSON object holding every number.

Design choices:
- One process, one set of weights. transformers' model is built first, with its own random
  initialisation, and ours is filled from its state dict by the strict loader, so the 257152-row
  embedding is initialised once. Both then read the same inputs. transformers is the test
  oracle, not a dependency: it is imported only when a benchmark runs.
- The reference runs its fastest correct attention: eager in a soft-capped (Gemma 2) decoder,
  because SDPA cannot soft-cap; SDPA in the image encoder and in a Gemma 1 decoder. The table
  names what each side ran.
- What is timed (measure.py says how: wall clock after one warm-up run, the median of `repeats`
  runs in which ours and transformers take turns, so that a busy shared machine slows both alike):
    prefill  one forward over image + prompt that fills an empty KV cache, at batch 1 (ours:
             `generate.prefill`; transformers: the forward `generate` makes first, keeping the
             logits of the last position only).
    decode   greedy generation of `new_tokens` tokens with EOS disabled, at batch 1 and 8. A
             token clock fed by our `on_token` hook and by transformers' streamer times the
             decoding steps alone, without the prefill.
    train    one step of the trainer: forward, the suffix loss, backward, gradient clipping at
             1.0 and AdamW. Ours runs all its steps, then transformers: two sets of gradients and
             optimizer states at once would not fit at full width.
- Peak memory (what a call adds on top of the weights; measure.py says how on a CPU and a GPU)
  is measured on a decode at batch 8 and on a training step.
- On a GPU two utilisation figures, as measure.py defines them: MFU of a training step and MBU
  of a decode at batch 1.
- "ratio" is how many times better ours is: transformers' time / ours, our tokens/s / theirs,
  their memory / ours. Above 1, ours is ahead.
"""

import gc
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, replace
from datetime import date

import torch

from .checkpoint import empty_model
from .checkpoint_config import hf_config_dict
from .config import PaliGemmaConfig, get_config
from .files import BadInput
from .gemma import attention_implementation
from .generate import decode, new_cache, prefill
from .layouts import load_hf_state_dict
from .measure import (TokenClock, copy_bandwidth, count_parameters, decode_step_bytes, peak_flops,
                      peak_memory_mib, proc_kib, take_turns, timed, train_flops)
from .paligemma import PaliGemma
from .tokenizer import BOS_ID
from .train import RECIPES, paligemma_step_loss

NO_EOS = -1  # an eos_id no token equals: every decode runs the full new_tokens
DECODE_BATCHES = (1, 8)


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: a model, its weights' dtype and the workload."""

    about: str
    model: PaliGemmaConfig
    dtype: torch.dtype
    prompt_len: int = 16  # text tokens of a decoding prompt: [bos prefix] ["\n"]
    new_tokens: int = 32  # tokens each decode generates
    suffix_len: int = 16  # training examples: the prompt, then this many answer tokens
    train_batch: int | None = 8  # None: no training step, for the reason in `no_train`
    no_train: str = ""
    autocast: bool = False  # train under bfloat16 autocast (fp32 weights), as the trainer on a GPU
    repeats: int = 5  # default number of timed runs


def cases(device: torch.device) -> dict[str, Case]:
    """The benchmark configurations for a device type."""
    three_b = get_config("paligemma2-3b-224")
    two_layers = replace(three_b, vision=replace(three_b.vision, depth=2), text=replace(three_b.text, depth=2))
    small = RECIPES["small"]
    small_model = PaliGemmaConfig(vision=replace(small.vision, image_size=small.high_res),
                                  text=replace(small.text, vocab_size=small.tokenizer_pieces + 1152))
    gpu = device.type == "cuda"
    return {
        "tiny": Case("every PaliGemma 2 mechanism at toy width, 2 layers per tower", get_config("tiny"),
                     torch.float32),
        "full-width": Case("PaliGemma 2 3B-224 widths and vocabulary, 2 layers per tower", two_layers,
                           torch.float32, new_tokens=8, train_batch=2, repeats=3),
        "3b-bf16": Case("PaliGemma 2 3B-224 at full depth", three_b, torch.bfloat16, new_tokens=16,
                        train_batch=8 if gpu else None, repeats=3,
                        no_train="weights, gradients and AdamW state of a 3B model exceed 24 GiB of CPU memory"),
        "small": Case("the trainer's small preset at 224 px", small_model, torch.float32, train_batch=32,
                      autocast=gpu),
    }


def default_configs(device: torch.device) -> list[str]:
    """What `--config all` runs: a CPU's set or a GPU's set."""
    return ["tiny", "3b-bf16", "small"] if device.type == "cuda" else ["tiny", "full-width", "3b-bf16"]


# ---------------------------------------------------------------------------------------------
# The two models and their inputs.

def _transformers():
    """The transformers package, or an error saying how to get it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("the bench compares against transformers, which is not installed: "
                          "pip install 'transformers>=5' (or pip install -e '.[test]')") from err
    transformers.logging.set_verbosity_error()
    return transformers


def attention_used(cfg: PaliGemmaConfig) -> dict[str, str]:
    """Which attention each implementation runs, per tower: ours as the config chooses it
    (`gemma.attention_implementation`), transformers' as `build_pair` sets it."""
    capped = cfg.text.attn_softcap is not None
    return {"ours": "image: sdpa; text: " + attention_implementation(cfg.text),
            "transformers": "image: sdpa; text: " + ("eager" if capped else "sdpa")}


def build_reference(case: Case, dtype: torch.dtype, device: torch.device):
    """transformers' model of the case, randomly initialised by transformers in `dtype`, with
    the attention `attention_used` names, in eval mode on `device`."""
    transformers = _transformers()
    hf_config = transformers.PaliGemmaConfig(**hf_config_dict(case.model))
    reference = transformers.PaliGemmaForConditionalGeneration._from_config(hf_config, dtype=dtype)
    text_attention = "eager" if case.model.text.attn_softcap is not None else "sdpa"
    reference.set_attn_implementation({"": text_attention, "text_config": text_attention, "vision_config": "sdpa"})
    return reference.to(device).eval()


def build_pair(case: Case, device: torch.device):
    """(transformers' model, ours) holding the same weights, in eval mode on `device`.

    transformers initialises its model (in the case's dtype); ours is built on the meta device,
    so nothing is initialised twice, then filled from the reference's state dict.
    """
    reference = build_reference(case, case.dtype, device)
    ours = empty_model(case.model, case.dtype, device)
    load_hf_state_dict(ours, reference.state_dict(), source="transformers model")
    return reference, ours.eval()


def make_inputs(case: Case, batch: int, suffix_len: int, device: torch.device, seed: int = 0) -> dict:
    """Random images and texts [B, ...] in both layouts: ours (pixel_values, input_ids, mask_ar,
    mask_input, mask_loss) and transformers' ("hf": image placeholders in front,
    token_type_ids 0 on the prefix block and 1 on the suffix, labels -100 off the suffix)."""
    cfg = case.model
    gen = torch.Generator().manual_seed(seed)
    length = case.prompt_len + suffix_len
    input_ids = torch.randint(3, cfg.text.vocab_size, (batch, length), generator=gen)  # [B, T], no pad/eos/bos
    input_ids[:, 0] = BOS_ID
    mask_ar = (torch.arange(length) >= case.prompt_len).long().expand(batch, length)  # [B, T]
    size = cfg.vision.image_size
    pixel_values = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1  # [B, 3, R, R]
    image_token = hf_config_dict(cfg)["image_token_index"]
    image = torch.full((batch, cfg.num_image_tokens), image_token)  # [B, P]
    hf_ids = torch.cat([image, input_ids], dim=1)  # [B, P + T]
    token_types = torch.cat([torch.zeros_like(image), mask_ar], dim=1)  # [B, P + T]
    hf = dict(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), token_type_ids=token_types,
              pixel_values=pixel_values.to(case.dtype))
    if suffix_len:
        hf["labels"] = hf_ids.masked_fill(token_types == 0, -100)
    ours = dict(pixel_values=pixel_values.to(case.dtype), input_ids=input_ids, mask_ar=mask_ar,
                mask_input=torch.ones_like(input_ids), mask_loss=mask_ar)
    to_device = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return {**to_device(ours), "hf": to_device(hf)}


# ---------------------------------------------------------------------------------------------
# One configuration.

def log(message: str) -> None:
    """Progress, on stderr: stdout holds the table and the JSON line only."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _figure(ours: float | None, theirs: float | None, higher_is_better: bool) -> dict:
    """Ours, theirs and the ratio (above 1: ours ahead)."""
    ratio = None
    if ours and theirs:
        ratio = ours / theirs if higher_is_better else theirs / ours
    return {"ours": ours, "transformers": theirs, "ratio": ratio}


def run_case(case: Case, device: torch.device, repeats: int | None = None, peak_tflops: float | None = None) -> dict:
    """Every figure of one configuration, as a dict (the JSON's `results[name]`)."""
    repeats = repeats or case.repeats
    started = time.perf_counter()
    log(f"{case.about}: building both models")
    reference, ours = build_pair(case, device)
    result = {"about": case.about, "dtype": str(case.dtype).removeprefix("torch."), "repeats": repeats,
              "parameters": count_parameters(ours), "attention": attention_used(case.model),
              "prompt_tokens": case.model.num_image_tokens + case.prompt_len, "new_tokens": case.new_tokens,
              "build_s": time.perf_counter() - started}
    log("prefill")
    result.update(_prefill_figures(case, reference, ours, device, repeats))
    log("decode")
    result.update(_decode_figures(case, reference, ours, device, repeats))
    if case.train_batch is None:
        result["train_skipped"] = case.no_train
    else:
        log("training step")
        result.update(_train_figures(case, reference, ours, device, repeats, peak_tflops))
    result["total_s"] = time.perf_counter() - started
    return result


def _prefill_figures(case: Case, reference, ours: PaliGemma, device: torch.device, repeats: int) -> dict:
    """Prefill latency at batch 1: a KV cache allocated and filled from image + prompt."""
    x = make_inputs(case, 1, 0, device)

    def ours_prefill():
        cache = new_cache(ours, x["pixel_values"], case.prompt_len, case.new_tokens)
        prefill(ours, x["pixel_values"], x["input_ids"], x["mask_ar"], x["mask_input"], cache)

    def reference_prefill():
        reference(**x["hf"], use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        seconds = take_turns({"ours": lambda: timed(ours_prefill, device),
                              "transformers": lambda: timed(reference_prefill, device)}, repeats)
    return {"prefill_ms": _figure(seconds["ours"] * 1e3, seconds["transformers"] * 1e3, higher_is_better=False)}


def _decode_figures(case: Case, reference, ours: PaliGemma, device: torch.device, repeats: int) -> dict:
    """Decoding speed at each batch size, greedy agreement, peak memory at the largest batch
    (and MBU at batch 1 on a GPU)."""
    figures = {}
    for batch in DECODE_BATCHES:
        x = make_inputs(case, batch, 0, device, seed=batch)
        tokens = {}

        def ours_decode() -> float:
            clock = TokenClock()
            tokens["ours"] = decode(ours, x["pixel_values"], x["input_ids"], x["mask_ar"], x["mask_input"],
                                    case.new_tokens, eos_id=NO_EOS, on_token=clock.on_token)
            return clock.tokens_per_second(batch)

        def reference_decode() -> float:
            clock = TokenClock()
            with torch.no_grad():
                out = reference.generate(**x["hf"], do_sample=False, max_new_tokens=case.new_tokens,
                                         eos_token_id=None, pad_token_id=0, streamer=clock)
            tokens["transformers"] = out[:, -case.new_tokens:]
            return clock.tokens_per_second(batch)

        speed = take_turns({"ours": ours_decode, "transformers": reference_decode}, repeats)
        figures[f"decode_b{batch}_tok_s"] = _figure(speed["ours"], speed["transformers"], higher_is_better=True)
        figures[f"greedy_agree_b{batch}"] = (tokens["ours"] == tokens["transformers"]).float().mean().item()
    largest = DECODE_BATCHES[-1]  # the closures above are this batch's
    figures[f"peak_mib_decode_b{largest}"] = _figure(peak_memory_mib(ours_decode, device),
                                                     peak_memory_mib(reference_decode, device), False)
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device)
        context = case.model.num_image_tokens + case.prompt_len + case.new_tokens // 2  # on average
        read = decode_step_bytes(ours, 1, context)
        speed = figures["decode_b1_tok_s"]
        figures["copy_bandwidth_gb_s"] = bandwidth / 1e9
        figures["mbu_decode_b1"] = _figure(read * speed["ours"] / bandwidth, read * speed["transformers"] / bandwidth,
                                           higher_is_better=True)
    return figures


def _train_figures(case: Case, reference, ours: PaliGemma, device: torch.device, repeats: int,
                   peak_tflops: float | None) -> dict:
    """Training step time and peak memory (and MFU on a GPU), ours first, then transformers."""
    batch = make_inputs(case, case.train_batch, case.suffix_len, device, seed=1)
    image_tokens = case.model.num_image_tokens

    def ours_loss():
        return paligemma_step_loss(ours, batch, image_tokens, case.autocast)[0]

    def reference_loss():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.autocast):
            return reference(**batch["hf"]).loss

    seconds, memory = {}, {}
    for name, model, loss_fn in (("ours", ours, ours_loss), ("transformers", reference, reference_loss)):
        model.train()
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

        seconds[name] = take_turns({name: lambda: timed(step, device)}, repeats)[name]
        memory[name] = peak_memory_mib(step, device)
        optimizer.zero_grad(set_to_none=True)
        del optimizer, step
        model.eval()
        gc.collect()
    figures = {"train_batch": case.train_batch, "train_tokens": case.train_batch * (image_tokens + case.prompt_len
                                                                                     + case.suffix_len),
               "train_step_ms": _figure(seconds["ours"] * 1e3, seconds["transformers"] * 1e3, False),
               "peak_mib_train": _figure(memory["ours"], memory["transformers"], False)}
    flops_peak = peak_flops(device, peak_tflops) if device.type == "cuda" else None
    if flops_peak:
        flops = train_flops(ours, case.train_batch, case.prompt_len + case.suffix_len)
        figures["mfu_train"] = _figure(flops / seconds["ours"] / flops_peak,
                                       flops / seconds["transformers"] / flops_peak, True)
        figures["peak_tflops"] = flops_peak / 1e12
    return figures


# ---------------------------------------------------------------------------------------------
# The report.

def machine(device: torch.device) -> dict:
    """What the figures were measured on."""
    info = {"device": device.type, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": _transformers().__version__}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.MULTILINE).group(1)
        info["memory_gib"] = round(proc_kib("/proc/meminfo", "MemTotal") / 2**20, 1)
    except (OSError, AttributeError):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


ROWS = [  # (label, key, number format)
    ("prefill, batch 1 (ms)", "prefill_ms", "{:.1f}"),
    ("decode, batch 1 (tokens/s)", "decode_b1_tok_s", "{:.1f}"),
    ("decode, batch 8 (tokens/s)", "decode_b8_tok_s", "{:.1f}"),
    ("peak memory, decode b8 (MiB)", "peak_mib_decode_b8", "{:.0f}"),
    ("training step (ms)", "train_step_ms", "{:.0f}"),
    ("peak memory, train step (MiB)", "peak_mib_train", "{:.0f}"),
    ("MBU, decode batch 1", "mbu_decode_b1", "{:.1%}"),
    ("MFU, training step", "mfu_train", "{:.1%}"),
]


def table(report: dict) -> str:
    """The human-readable report: one block of rows per configuration."""
    m = report["machine"]
    where = m.get("gpu") or f"{m.get('cpu', 'CPU')}, {m['threads']} threads"
    lines = [f"minipaligemma bench, {report['date']}: ours vs transformers {m['transformers']} "
             f"(torch {m['torch']}) on {where}",
             "ratio = how many times better ours is (time and memory: theirs / ours; tokens/s: ours / theirs)", ""]
    fmt = "{:<12} {:<32} {:>12} {:>13} {:>7}"
    lines.append(fmt.format("config", "figure", "ours", "transformers", "ratio"))
    for name, r in report["results"].items():
        lines.append(f"{name:<12} {r['about']}; {r['dtype']}, {r['prompt_tokens']} prompt tokens, "
                     f"{r['new_tokens']} new, median of {r['repeats']}")
        for label, key, number in ROWS:
            if key not in r:
                continue
            f = r[key]
            show = lambda v: "n/a" if v is None else number.format(v)  # noqa: E731
            ratio = "n/a" if f["ratio"] is None else f"{f['ratio']:.2f}"
            lines.append(fmt.format("", label, show(f["ours"]), show(f["transformers"]), ratio))
        if "train_skipped" in r:
            lines.append(fmt.format("", "training step", "skipped", "", "") + f"  ({r['train_skipped']})")
        agree = ", ".join(f"b{b} {r[f'greedy_agree_b{b}']:.0%}" for b in DECODE_BATCHES)
        lines.append(f"{'':<12} greedy tokens equal: {agree}; attention: ours {r['attention']['ours']}, "
                     f"transformers {r['attention']['transformers']}")
    return "\n".join(lines)


def bench(configs: list[str], device: str = "cpu", repeats: int | None = None, peak_tflops: float | None = None,
          threads: int | None = None, command: str = "") -> dict:
    """Run the named configurations (or "all") and print the table, then the JSON line; return
    the report (the JSON object). `threads` sets torch's CPU threads (default: torch's choice,
    one per core; on a machine busy with other work, fewer threads than cores time more steadily)."""
    device = torch.device(device)
    available = cases(device)
    names = default_configs(device) if configs == ["all"] else configs
    unknown = [n for n in names if n not in available]
    if unknown:
        raise BadInput(f"unknown bench config(s) {unknown}; known: {', '.join(available)} or all")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or threads_before)
    try:
        report = {"date": date.today().isoformat(), "command": command, "machine": machine(device), "results": {}}
        for name in names:
            torch.manual_seed(0)
            report["results"][name] = run_case(available[name], device, repeats, peak_tflops)
            gc.collect()
    finally:
        torch.set_num_threads(threads_before)
    print(table(report))
    print(json.dumps(report), flush=True)
    return report
