"""Fine-tuning methods side by side: the peak memory and step time of one training step of full
fine-tuning, the colab recipe, LoRA and QLoRA on the same model and batch, measured, with the
memory planner's figure beside each (docs/training.md §7).

    python -m minipaligemma.finetune_bench                      # full width, 2 layers per tower
    python -m minipaligemma.finetune_bench --batch 2 --text-len 32 --steps 3 --threads 1
    python -m minipaligemma.finetune_bench --config 3b-bf16 --methods lora,qlora --batch 1 \
        --text-len 128 --steps 1 --checkpoint-activations --max-gib 13   # PaliGemma 2 3B, full depth

It prints a table and, as its last line, one JSON object holding every number.

- The model is one of the bench's configurations (bench.cases), with random weights and the
  final soft-cap off as in stage 3: "full-width" (the default), PaliGemma 2 3B-224's widths and
  257k vocabulary with two layers per tower, in float32; or "3b-bf16", PaliGemma 2 3B-224 at
  full depth in bfloat16. The weights are allocated in their dtype on a model built on the meta
  device and filled a few rows at a time (`measure.random_model`), so a 3B never has a float32
  copy (12 GiB).
- Each method is prepared exactly as stage 3 prepares it (`train.Transfer.prepare`: LoRA rank 16
  on the decoder's linear layers; QLoRA the same on NF4 blocks; the colab recipe's decoder
  attention; the base in the configuration's dtype; with `--checkpoint-activations`,
  every block checkpointed), with stage 3's optimizer (AdamW, or SGD for the colab recipe), and
  trains on the planner's batch (`plan.example_batch`: a quarter prompt, the rest answer).
- The planner goes first: a method whose planned peak exceeds `max_gib` (by default the memory
  the machine has available) is not run, and its row says so (full fine-tuning of the 3B).
- Each method runs in a fresh process, so that no method inherits another's freed memory.
  Memory is what the prepared model holds (resident set growth while it is built) plus the
  growth of the peak resident set (Linux's VmHWM) over the training steps: weights,
  gradients, optimizer state and the step's activations at their high-water mark. The peak
  while the model is built and prepared is reported beside it (`build_peak_mib`): QLoRA's base
  is quantized from a model in the configuration's dtype, a higher but passing peak that the
  planner leaves out. glibc is told to map every allocation over 64 KiB on its own, so that freed
  tensors leave the resident set (as tests/test_plan.py measures). The planner's `peak` counts
  the same things, for a CPU's optimizer path.
- Time is the median wall-clock time of `steps` steps after one warm-up step, which creates the
  optimizer state. On a busy machine it is only a rough figure.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import time
from dataclasses import replace

import torch

from .bench import cases
from .config import PaliGemmaConfig
from .measure import peak_memory_mib, proc_kib, random_model
from .plan import example_batch, plan, step_loss
from .train import Transfer

METHODS = {"full": Transfer("full"), "colab": Transfer("colab"), "lora": Transfer("lora", lora_rank=16),
           "qlora": Transfer("qlora", lora_rank=16)}
CONFIGS = ("full-width", "3b-bf16")  # bench.cases that one 24 GiB CPU can train with LoRA
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
LEARNING_RATE = 1e-5  # any small rate: what is measured does not depend on it


def bench_config(name: str) -> tuple[PaliGemmaConfig, str]:
    """The model configuration of bench case `name` with the final soft-cap off (as stage 3
    transfers), and the name of its dtype."""
    case = cases(torch.device("cpu"))[name]
    return replace(case.model, text=replace(case.model.text, final_softcap=None)), DTYPE_NAMES[case.dtype]


def transfer_of(method: str, dtype: str, checkpoint_activations: bool) -> Transfer:
    """Stage 3's preparation for `method` on a base in `dtype`, blocks checkpointed or not."""
    transfer = METHODS[method]
    base_dtype = dtype if transfer.method in ("lora", "qlora") else None  # full and colab keep the model's dtype
    return replace(transfer, base_dtype=base_dtype, checkpoint_activations=checkpoint_activations)


def measure(config, dtype: str, transfer: Transfer, batch: int, text_len: int, steps: int, threads: int,
            results) -> None:
    """One method's figures, in this (fresh) process, put on the `results` queue."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bare = proc_kib("/proc/self/status", "VmRSS")
    model = transfer.prepare(random_model(config, dtype).train(), torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(trainable, lr=LEARNING_RATE) if transfer.optimizer == "sgd"
                 else torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0))
    inputs = example_batch(config, batch, text_len)
    held = (proc_kib("/proc/self/status", "VmRSS") - bare) / 1024  # the model, as prepared
    build_peak = (proc_kib("/proc/self/status", "VmHWM") - bare) / 1024  # while it was built and prepared
    seconds = []

    def step() -> None:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss(model, inputs).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        seconds.append(time.perf_counter() - started)

    def train() -> None:
        for _ in range(1 + steps):  # the first step creates the optimizer state
            step()

    peak = held + peak_memory_mib(train, torch.device("cpu"))
    results.put({"trainable": sum(p.numel() for p in trainable), "peak_mib": peak, "build_peak_mib": build_peak,
                 "step_s": statistics.median(seconds[1:]), "first_step_s": seconds[0]})


def planned(config, dtype: str, transfer: Transfer, batch: int, text_len: int):
    """The planner's MemoryPlan for the method as `measure` runs it, on a CPU."""
    lora = transfer.lora_rank if transfer.method in ("lora", "qlora") else None
    return plan(config, batch, text_len, lora=lora, qlora=transfer.method == "qlora",
                checkpoint_activations=transfer.checkpoint_activations, optimizer=transfer.optimizer,
                dtype=dtype, lora_targets=transfer.lora_targets, device="cpu", colab=transfer.method == "colab")


def available_gib() -> float:
    """The memory this machine has available now (Linux's MemAvailable), in GiB."""
    return proc_kib("/proc/meminfo", "MemAvailable") / 2**20


def finetune_bench(batch: int = 2, text_len: int = 32, steps: int = 3, threads: int = 1, methods=tuple(METHODS),
                   config_name: str = "full-width", checkpoint_activations: bool = False,
                   max_gib: float | None = None) -> dict:
    """Plan every method, then measure each one planned to fit in `max_gib` (default: the memory
    available) in its own process; print the table, then the JSON line; return the report."""
    config, dtype = bench_config(config_name)
    max_gib = available_gib() if max_gib is None else max_gib
    context = multiprocessing.get_context("spawn")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc as each new process starts
    rows = []
    for method in methods:
        transfer = transfer_of(method, dtype, checkpoint_activations)
        memory_plan = planned(config, dtype, transfer, batch, text_len)
        row = {"method": method, "planned_mib": memory_plan.peak / 2**20}
        if memory_plan.peak > max_gib * 2**30:
            row.update(trainable=memory_plan.trainable_params, peak_mib=None, build_peak_mib=None, step_s=None,
                       not_run=f"planned {memory_plan.peak / 2**30:.1f} GiB > {max_gib:.1f} GiB")
            print(f"finetune_bench: {method} not run: {row['not_run']}", flush=True)
            rows.append(row)
            continue
        results = context.Queue()
        process = context.Process(target=measure, args=(config, dtype, transfer, batch, text_len, steps, threads,
                                                        results))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"{method}: the measuring process ended with status {process.exitcode} "
                               "(a negative status is a signal: -9, killed, often means out of memory)")
        row.update(results.get())
        rows.append(row)
        print(f"finetune_bench: {method} done", flush=True)
    setting = f"{cases(torch.device('cpu'))[config_name].about}, {dtype}, CPU"
    report = {"config": setting + (", activation checkpointing" if checkpoint_activations else ""),
              "batch": batch, "text_len": text_len, "steps": steps, "threads": threads, "rows": rows}
    full = next((r["peak_mib"] for r in rows if r["method"] == "full"), None)
    print(report["config"])
    print(f"{'method':<8} {'trainable':>13} {'peak MiB':>9} {'planned':>8} {'error':>6} {'of full':>8} {'step s':>7}")
    for r in rows:
        if r["peak_mib"] is None:
            print(f"{r['method']:<8} {r['trainable']:>13,} {'not run':>9} {r['planned_mib']:>8.0f}")
            continue
        share = f"{r['peak_mib'] / full:.0%}" if full else "n/a"
        error = f"{r['planned_mib'] / r['peak_mib'] - 1:+.1%}"
        print(f"{r['method']:<8} {r['trainable']:>13,} {r['peak_mib']:>9.0f} {r['planned_mib']:>8.0f} {error:>6} "
              f"{share:>8} {r['step_s']:>7.1f}")
    print(json.dumps(report), flush=True)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minipaligemma.finetune_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="full-width", choices=CONFIGS,
                        help="full-width: 2 layers per tower, float32; 3b-bf16: PaliGemma 2 3B-224, full depth, bfloat16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, among {','.join(METHODS)}")
    parser.add_argument("--checkpoint-activations", action="store_true", help="checkpoint every block, every method")
    parser.add_argument("--max-gib", type=float, default=None,
                        help="run only the methods planned to fit in this many GiB (default: the memory available)")
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    if args.batch < 1 or args.text_len < 4 or args.steps < 1 or args.threads < 1:
        parser.error("--batch, --steps and --threads must be at least 1, --text-len at least 4")
    finetune_bench(args.batch, args.text_len, args.steps, args.threads, tuple(args.methods.split(",")), args.config,
                   args.checkpoint_activations, args.max_gib)


if __name__ == "__main__":
    main()
