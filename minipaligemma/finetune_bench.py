"""Fine-tuning methods side by side: the peak memory and step time of one training step of full
fine-tuning, the colab recipe, LoRA and QLoRA on the same model and batch, measured, with the
memory planner's figure beside each (docs/training.md §7).

    python -m minipaligemma.finetune_bench                      # full width, 2 layers per tower
    python -m minipaligemma.finetune_bench --batch 2 --text-len 32 --steps 3 --threads 1

It prints a table and, as its last line, one JSON object holding every number.

- The model is the bench's "full-width" configuration: PaliGemma 2 3B-224's widths and 257k
  vocabulary, two layers per tower (random weights, float32), the final soft-cap off as in
  stage 3. Each method is prepared exactly as stage 3 prepares it (`train.Transfer.prepare`:
  LoRA rank 16 on the decoder's linear layers; QLoRA the same on NF4 blocks; the colab recipe's
  decoder attention), with stage 3's optimizer (AdamW, or SGD for the colab recipe), and trains
  on the planner's batch (`plan.example_batch`: a quarter prompt, the rest answer).
- Each method runs in a fresh process, so that no method inherits another's freed memory.
  Memory is what the prepared model holds (resident set growth while it is built) plus the
  growth of the peak resident set (Linux's VmHWM) over the training steps: weights,
  gradients, optimizer state and the step's activations at their high-water mark. (Building
  QLoRA's base quantizes a float32 model first, a higher but passing peak, left out.) glibc is told to map every allocation over 64 KiB on its own, so that freed
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
from .measure import peak_memory_mib, proc_kib
from .paligemma import PaliGemma
from .plan import example_batch, plan, step_loss
from .train import Transfer

METHODS = {"full": Transfer("full"), "colab": Transfer("colab"), "lora": Transfer("lora", lora_rank=16),
           "qlora": Transfer("qlora", lora_rank=16)}
LEARNING_RATE = 1e-5  # any small rate: what is measured does not depend on it


def measure(config, method: str, batch: int, text_len: int, steps: int, threads: int, results) -> None:
    """One method's figures, in this (fresh) process, put on the `results` queue."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    transfer = METHODS[method]
    bare = proc_kib("/proc/self/status", "VmRSS")
    model = transfer.prepare(PaliGemma(config).train(), torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(trainable, lr=LEARNING_RATE) if transfer.optimizer == "sgd"
                 else torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0))
    inputs = example_batch(config, batch, text_len)
    held = (proc_kib("/proc/self/status", "VmRSS") - bare) / 1024  # the model, as prepared
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

    # Building QLoRA's base quantizes a float32 model, whose peak is not the training step's.
    peak = held + peak_memory_mib(train, torch.device("cpu"))
    results.put({"method": method, "trainable": sum(p.numel() for p in trainable), "peak_mib": peak,
                 "step_s": statistics.median(seconds[1:])})


def planned(config, method: str, batch: int, text_len: int) -> float:
    """The planner's peak (MiB) for the method as `measure` runs it, on a CPU, in float32."""
    transfer = METHODS[method]
    lora = transfer.lora_rank if transfer.method in ("lora", "qlora") else None
    return plan(config, batch, text_len, lora=lora, qlora=transfer.method == "qlora", optimizer=transfer.optimizer,
                dtype="float32", lora_targets=transfer.lora_targets, device="cpu",
                colab=transfer.method == "colab").peak / 2**20


def finetune_bench(batch: int = 2, text_len: int = 32, steps: int = 3, threads: int = 1,
                   methods=tuple(METHODS)) -> dict:
    """Measure every method in its own process and plan it; print the table, then the JSON
    line; return the report."""
    config = cases(torch.device("cpu"))["full-width"].model
    config = replace(config, text=replace(config.text, final_softcap=None))
    context = multiprocessing.get_context("spawn")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc as each new process starts
    rows = []
    for method in methods:
        results = context.Queue()
        process = context.Process(target=measure, args=(config, method, batch, text_len, steps, threads, results))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"{method}: the measuring process ended with status {process.exitcode} "
                               "(a negative status is a signal: -9, killed, often means out of memory)")
        row = results.get()
        row["planned_mib"] = planned(config, method, batch, text_len)
        rows.append(row)
        print(f"finetune_bench: {method} done", flush=True)
    report = {"config": "full-width (PaliGemma 2 3B-224 widths, 2 layers per tower), float32, CPU",
              "batch": batch, "text_len": text_len, "steps": steps, "threads": threads, "rows": rows}
    full = next((r["peak_mib"] for r in rows if r["method"] == "full"), None)
    print(f"{'method':<8} {'trainable':>13} {'peak MiB':>9} {'planned':>8} {'of full':>8} {'step s':>7}")
    for r in rows:
        share = f"{r['peak_mib'] / full:.0%}" if full else "n/a"
        print(f"{r['method']:<8} {r['trainable']:>13,} {r['peak_mib']:>9.0f} {r['planned_mib']:>8.0f} {share:>8} "
              f"{r['step_s']:>7.1f}")
    print(json.dumps(report), flush=True)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minipaligemma.finetune_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, among {','.join(METHODS)}")
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    finetune_bench(args.batch, args.text_len, args.steps, args.threads, tuple(args.methods.split(",")))


if __name__ == "__main__":
    main()
