"""The training loop every model here is trained with, and its checkpoints.

- `fit` takes the parameter groups with their learning-rate schedules and a function that
  computes the loss of step t. Step t always reads the same examples (the world is indexed; a
  JSONL file is shuffled per epoch from a seed), so a run that is killed and started again ends
  with exactly the weights of an uninterrupted one.
- The optimizer is Adam (AdamW without weight decay), with global-norm clipping at 1.0, as
  big_vision's transfer configs.
- A checkpoint is one safetensors file holding the model, the optimizer state and, in its
  metadata, the trainer state (step, losses); a JSON copy of that state sits beside it for
  people. Every step also gets a line in a JSONL log beside it (loss, loss per task, learning
  rates, tokens/s), for plots. All three are written atomically (files.atomic_write), the log
  first: after a crash the log may run ahead of the checkpoint, never behind, and resuming cuts
  it back to the checkpoint's step.
- A NaN or infinite loss stops the run, naming the step, before any update is made, so the
  last checkpoint stays good.
"""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm import tqdm

from .checkpoint import read_safetensors_file
from .distributed import rank_and_world, wrap_for_training
from .files import BadInput, atomic_write


OPTIMIZERS = {"adamw": partial(torch.optim.AdamW, weight_decay=0.0), "sgd": torch.optim.SGD}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class ParamGroup:
    """Parameters sharing a learning-rate schedule: lr(t) = base_lr * schedule(t)."""

    name: str
    params: list[nn.Parameter]
    base_lr: float
    schedule: Callable[[int], float]


class StepLoss(NamedTuple):
    """What a loss function returns for one step: the loss to minimise, how many tokens the
    step read (for tokens/s), and optionally the loss of each task of a mixture (logged)."""

    loss: torch.Tensor
    tokens: int
    task_losses: dict[str, float] | None = None


# ---------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file (model, optimizer, trainer state) and a JSON copy of the state.

def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write model + optimizer tensors and the trainer state (in the metadata) to `path`, and a
    JSON copy of the state beside it, each atomically.

    Every process must call it (a sharded model is gathered first); rank 0 writes.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    if rank_and_world()[0] != 0:
        return
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    for name, param_state in optimizer_state["state"].items():
        tensors.update({f"optimizer/{name}/{k}": torch.as_tensor(v).detach().cpu().contiguous()
                        for k, v in param_state.items()})
    state = dict(state, param_groups=optimizer_state["param_groups"])
    atomic_write(path, lambda f: f.write(safetensors_bytes(tensors, metadata={"trainer_state": json.dumps(state)})))
    atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(state, indent=1).encode()))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer from `path` (strictly, sharding them if the model is
    sharded); return the trainer state. A damaged file is a BadInput naming it: it is never
    silently replaced by a fresh start."""
    try:
        tensors, metadata = read_safetensors_file(path)  # one read; a damaged file is a BadInput
        state = json.loads(metadata["trainer_state"])
    except (BadInput, KeyError, TypeError, ValueError) as err:
        raise BadInput(f"{path}: not a readable training checkpoint ({type(err).__name__}: {err}); "
                       "delete it to start this stage again from scratch") from None
    model_state = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    optimizer_state: dict = {"state": {}, "param_groups": state.pop("param_groups")}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            name, field = key.removeprefix("optimizer/").rsplit("/", 1)
            optimizer_state["state"].setdefault(name, {})[field] = value
    try:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as err:
        raise BadInput(f"{path}: does not fit this model and optimizer ({err}); "
                       "was it written by another recipe? Delete it to start this stage again") from None
    return state


def read_log(path: Path, steps: int) -> list[dict]:
    """The JSONL step log at `path`, cut back to its first `steps` steps ([] if there is none)."""
    if not path.exists():
        return []
    return [record for record in map(json.loads, path.read_text().splitlines()) if record["step"] < steps]


def _write_log(path: Path, records: list[dict]) -> None:
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


# ---------------------------------------------------------------------------------------------
# The loop.

def fit(model: nn.Module, groups: list[ParamGroup], loss_fn: Callable[[nn.Module, int], StepLoss],
        steps: int, checkpoint: Path, desc: str, checkpoint_every: int = 50, fsdp: bool = False,
        optimizer: str = "adamw") -> list[float]:
    """Train for `steps` steps, resuming from `checkpoint` if it exists; return the loss curve.

    loss_fn(model, t) computes step t's StepLoss on this process's share of the batch. The
    step log goes to `checkpoint` with the suffix .jsonl. `optimizer` is "adamw" (Adam without
    weight decay) or "sgd" (plain gradient descent: no state, as big_vision's colab).
    """
    rank, _ = rank_and_world()
    names = {id(p): name for name, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g.params] for g in groups]
    trained = wrap_for_training(model, fsdp)  # sharding replaces the parameters: find them by name
    current = dict(model.named_parameters())
    param_lists = [[current[name] for name in group] for group in group_names]
    param_groups = [{"params": ps, "lr": g.base_lr} for ps, g in zip(param_lists, groups)]
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    optimizer = OPTIMIZERS[optimizer](param_groups)
    state = {"step": 0, "losses": []}
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, model, optimizer)
    log_path = checkpoint.with_suffix(".jsonl")
    records = read_log(log_path, state["step"])
    params = [p for ps in param_lists for p in ps]
    bar = tqdm(total=steps, initial=state["step"], desc=desc, disable=rank != 0, dynamic_ncols=True)
    for t in range(state["step"], steps):
        started = time.perf_counter()
        for g, pg in zip(groups, optimizer.param_groups):
            pg["lr"] = g.base_lr * g.schedule(t)
        step = loss_fn(trained, t)
        reported = step.loss.detach().clone()
        if dist.is_initialized():  # report the global batch's loss, the mean of the shares'
            dist.all_reduce(reported)
            reported /= dist.get_world_size()
        if not torch.isfinite(reported):
            last = f"{checkpoint} (step {state['step']})" if checkpoint.exists() else "none yet"
            raise TrainingDiverged(f"{desc}: loss is {reported.item()} at step {t}; last good checkpoint: {last}")
        optimizer.zero_grad(set_to_none=True)
        step.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        state["losses"].append(reported.item())
        state["step"] = t + 1
        tokens_per_s = step.tokens / (time.perf_counter() - started)
        records.append({"step": t, "loss": reported.item(), "task_losses": step.task_losses or {},
                        "lr": {g.name: pg["lr"] for g, pg in zip(groups, optimizer.param_groups)},
                        "tokens_per_s": round(tokens_per_s, 1)})
        bar.update(1)
        bar.set_postfix(loss=f"{reported.item():.3f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}",
                        tok_s=f"{tokens_per_s:.0f}")
        if state["step"] % checkpoint_every == 0 or state["step"] == steps:
            if rank == 0:
                _write_log(log_path, records)
            save_checkpoint(checkpoint, model, optimizer, state)
    bar.close()
    return state["losses"]
