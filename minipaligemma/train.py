"""The trainer: PaliGemma's stages, one after another, each resumable (paligemma-spec.md §6).

    stage 0  unimodal pretraining, at toy scale: a tokenizer trained on the world's text, the
             mask VQ-VAE on its masks, the image encoder with SigLIP's sigmoid loss against a
             small text tower, the decoder as a language model on the world's text.
    stage 1  multimodal pretraining at the low resolution on the task mixture. Nothing is
             frozen; the image encoder's learning rate warms up slowly and linearly so that
             the early, misaligned decoder gradients do not wreck it; an rsqrt schedule;
             soft-caps on. The projector starts at zero, as big_vision's.
    stage 2  the higher resolution: position embeddings resampled, longer text, the mixture
             re-weighted toward resolution-hungry tasks (OCR, detection, segmentation). The
             rsqrt schedule continues where stage 1 stopped (one "infinite" schedule).
    stage 3  transfer to one task: cosine schedule with 5 % warm-up, the final soft-cap off,
             optionally a frozen image encoder; from our stage 2 or from official weights
             (`--init`) on a JSONL dataset of your own.

Design choices:
- One loop (`fit`) trains every model here: it takes the parameter groups with their learning
  rate schedules and a function that computes the loss of step t. Step t always reads the same
  examples (the world is indexed; a JSONL file is shuffled per epoch from a seed), so a resumed
  run ends with exactly the weights of an uninterrupted one.
- A checkpoint is one safetensors file holding the model, the optimizer state and, in its
  metadata, the trainer state (step, losses); a JSON copy of that state sits beside it for
  people. Both are written to a temporary name and renamed, so a crash never leaves half a
  checkpoint. A NaN or infinite loss stops the run, naming the step, before any update is made,
  so the last checkpoint stays good.
- Under `torchrun --nproc_per_node N`, each process takes its share of every global batch and
  DistributedDataParallel averages the gradients; `--fsdp` shards the model instead (FSDP2),
  for models that do not fit one device. Rank 0 alone evaluates and writes.
- Each stage ends with a held-out evaluation of every task (greedy decoding), printed as a
  table and written to metrics.json, and a loss-curve PNG.
- The optimizer is Adam (AdamW without decay by default), with global-norm clipping at 1.0, as
  big_vision's transfer configs.
"""

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from tqdm import tqdm

from .checkpoint import at_resolution, load, to_hf_state_dict, write_hf_folder
from .config import PaliGemmaConfig, TextConfig, VisionConfig
from .data import (SMALL_WORLD, STAGE1_MIXTURE, STAGE2_MIXTURE, TASKS, TINY_WORLD, Example, JsonlDataset, World,
                   WorldConfig)
from .files import atomic_write
from .generate import generate
from .image import preprocess
from .paligemma import PaliGemma, make_attn_mask, prefix_lm_loss
from .siglip import SigLIP, SigLIPEncoder, TextEncoder
from .tasks import (TaskObject, cider_d, count_detections, exact_match, mask_to_target, mean_iou,
                    parse_detections, parse_segmentations)
from .tokenizer import Tokenizer, encode_example, pad_batch, train_tokenizer
from .vqvae import TINY_CONFIG, load_vqvae, save_vqvae, train_vqvae


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass(frozen=True)
class Recipe:
    """Everything a run needs: model shape, world, resolutions, steps and learning rates."""

    vision: VisionConfig  # image_size is replaced by each stage's resolution
    text: TextConfig  # vocab_size is replaced by the tokenizer's
    world: WorldConfig
    low_res: int
    high_res: int
    batch_size: int
    tokenizer_pieces: int  # plain SentencePiece pieces; <loc>/<seg> come on top
    vqvae_steps: int
    siglip_steps: int
    lm_steps: int
    stage1_steps: int
    stage2_steps: int
    stage3_steps: int
    transfer_task: str = "ocr"  # stage 3's task unless the command line names another
    lr: float = 1e-3
    transfer_lr: float = 3e-4
    warmup_steps: int = 20
    vision_warmup_steps: int = 150  # the slow linear warm-up of the image encoder in stage 1
    rsqrt_timescale: int = 100
    eval_examples: int = 48
    checkpoint_every: int = 50
    dtype: str = "float32"


RECIPES = {
    # A laptop CPU, all stages in minutes. 32 -> 64 px, 8 px patches: 16 -> 64 image tokens.
    "tiny": Recipe(
        vision=VisionConfig(image_size=32, patch_size=8, width=128, depth=3, mlp_dim=256, num_heads=4),
        text=TextConfig(version=2, width=128, depth=3, mlp_dim=384, num_heads=4, num_kv_heads=2, head_dim=32,
                        query_pre_attn_scalar=32),
        world=TINY_WORLD, low_res=32, high_res=64, batch_size=32, tokenizer_pieces=512, vqvae_steps=300,
        siglip_steps=200, lm_steps=300, stage1_steps=1200, stage2_steps=2400, stage3_steps=200,
        vision_warmup_steps=300, rsqrt_timescale=1000, eval_examples=96),
    # One GPU, about an hour in bfloat16: 112 -> 224 px with So400m's 14 px patches.
    "small": Recipe(
        vision=VisionConfig(image_size=112, patch_size=14, width=384, depth=6, mlp_dim=1536, num_heads=6),
        text=TextConfig(version=2, width=512, depth=8, mlp_dim=2048, num_heads=8, num_kv_heads=4, head_dim=64,
                        query_pre_attn_scalar=64),
        world=SMALL_WORLD, low_res=112, high_res=224, batch_size=128, tokenizer_pieces=1000, vqvae_steps=2000,
        siglip_steps=2000, lm_steps=2000, stage1_steps=8000, stage2_steps=3000, stage3_steps=1000, lr=5e-4,
        transfer_lr=1e-4, warmup_steps=200, vision_warmup_steps=2000, rsqrt_timescale=2000, eval_examples=256,
        checkpoint_every=500, dtype="bfloat16"),
}


# ---------------------------------------------------------------------------------------------
# Schedules: functions of the global step t -> a learning-rate multiplier.

def rsqrt_schedule(t: int, warmup: int, timescale: int) -> float:
    """Linear warm-up, then 1 / sqrt(t / timescale): big_vision's "infinite" schedule."""
    return min(1.0, (t + 1) / warmup) * math.sqrt(timescale / max(t + 1, timescale))


def slow_warmup(t: int, warmup: int) -> float:
    """The image encoder's extra linear warm-up in stage 1 (P1 §3.2.2, Fig. 3)."""
    return min(1.0, (t + 1) / warmup)


def cosine_schedule(t: int, total: int, warmup_fraction: float = 0.05) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 0: the transfer schedule."""
    warmup = max(1, int(total * warmup_fraction))
    if t < warmup:
        return (t + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------------------------------------
# Distributed helpers: a no-op on one process.

def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) when not distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed() -> None:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def local_share(items: list) -> list:
    """This process's contiguous share of a global batch."""
    rank, world = rank_and_world()
    if len(items) % world:
        raise ValueError(f"global batch of {len(items)} does not split over {world} processes")
    share = len(items) // world
    return items[rank * share:(rank + 1) * share]


def wrap_for_training(model: nn.Module, fsdp: bool) -> nn.Module:
    """DistributedDataParallel (or FSDP2 sharding per block) when distributed; else the model."""
    if not dist.is_initialized():
        return model
    if fsdp:
        for module in model.modules():
            if type(module).__name__ in ("EncoderBlock", "DecoderBlock"):
                fully_shard(module)
        return fully_shard(model)
    return nn.parallel.DistributedDataParallel(model)


# ---------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file (model, optimizer, trainer state), written atomically.

def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write model + optimizer tensors and the trainer state (in the metadata) to `path`, and a
    JSON copy of the state beside it; each through a temporary file and a rename.

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
    sharded); return the trainer state."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        state = json.loads(f.metadata()["trainer_state"])
    model_state = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    optimizer_state: dict = {"state": {}, "param_groups": state.pop("param_groups")}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            name, field = key.removeprefix("optimizer/").rsplit("/", 1)
            optimizer_state["state"].setdefault(name, {})[field] = value
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
    return state


# ---------------------------------------------------------------------------------------------
# The loop.

@dataclass
class ParamGroup:
    """Parameters sharing a learning-rate schedule: lr(t) = base_lr * schedule(t)."""

    name: str
    params: list[nn.Parameter]
    base_lr: float
    schedule: Callable[[int], float]


def fit(model: nn.Module, groups: list[ParamGroup], loss_fn: Callable[[nn.Module, int], tuple[torch.Tensor, int]],
        steps: int, checkpoint: Path, desc: str, checkpoint_every: int = 50, fsdp: bool = False,
        stop_after: int | None = None) -> list[float]:
    """Train for `steps` steps, resuming from `checkpoint` if it exists; return the loss curve.

    loss_fn(model, t) -> (loss, tokens) computes step t's loss on this process's share of the
    batch. `stop_after` ends the run early after that many steps (the tests use it to simulate
    a crash); the schedules still see the full `steps`.
    """
    rank, _ = rank_and_world()
    names = {id(p): name for name, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g.params] for g in groups]
    trained = wrap_for_training(model, fsdp)  # sharding replaces the parameters: find them by name
    current = dict(model.named_parameters())
    param_lists = [[current[name] for name in group] for group in group_names]
    optimizer = torch.optim.AdamW([{"params": ps, "lr": g.base_lr} for ps, g in zip(param_lists, groups)],
                                  weight_decay=0.0)
    state = {"step": 0, "losses": []}
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, model, optimizer)
    params = [p for ps in param_lists for p in ps]
    bar = tqdm(total=steps, initial=state["step"], desc=desc, disable=rank != 0, dynamic_ncols=True)
    started, tokens_seen = time.time(), 0
    for t in range(state["step"], steps if stop_after is None else min(steps, stop_after)):
        for g, pg in zip(groups, optimizer.param_groups):
            pg["lr"] = g.base_lr * g.schedule(t)
        loss, tokens = loss_fn(trained, t)
        reported = loss.detach().clone()
        if dist.is_initialized():  # report the global batch's loss, the mean of the shares'
            dist.all_reduce(reported)
            reported /= dist.get_world_size()
        if not torch.isfinite(reported):
            last = f"{checkpoint} (step {state['step']})" if checkpoint.exists() else "none yet"
            raise TrainingDiverged(f"{desc}: loss is {reported.item()} at step {t}; last good checkpoint: {last}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        state["losses"].append(reported.item())
        state["step"] = t + 1
        tokens_seen += tokens
        bar.update(1)
        bar.set_postfix(loss=f"{reported.item():.3f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}",
                        tok_s=f"{tokens_seen / (time.time() - started):.0f}")
        if state["step"] % checkpoint_every == 0 or state["step"] == steps:
            save_checkpoint(checkpoint, model, optimizer, state)
    bar.close()
    return state["losses"]


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    """A loss curve as a PNG, drawn with PIL (no plotting library needed)."""
    width, height, pad = 640, 360, 40
    image = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(image)
    d.rectangle([pad, pad, width - pad, height - pad], outline="black")
    d.text((pad, 10), f"{title}: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps", fill="black")
    if len(losses) > 1:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0
        points = [(pad + i * (width - 2 * pad) / (len(losses) - 1),
                   height - pad - (v - low) / span * (height - 2 * pad)) for i, v in enumerate(losses)]
        d.line(points, fill=(31, 119, 180), width=2)
        d.text((4, pad - 6), f"{high:.2f}", fill="black")
        d.text((4, height - pad - 6), f"{low:.2f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ---------------------------------------------------------------------------------------------
# Batches: step t of a run always reads the same examples.

def world_examples(world: World, size: int, mixture: dict, batch_size: int, first_batch: int, t: int) -> list[Example]:
    """This process's share of global batch `first_batch + t` of the world's training stream."""
    start = (first_batch + t) * batch_size
    stream = world.examples(size, mixture, start=start)
    return local_share([next(stream) for _ in range(batch_size)])


def jsonl_examples(dataset: JsonlDataset, batch_size: int, t: int, seed: int = 0) -> list[Example]:
    """This process's share of global batch t of a JSONL dataset, reshuffled every epoch."""
    picks = []
    for k in range(t * batch_size, (t + 1) * batch_size):
        epoch, i = divmod(k, len(dataset))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        picks.append(int(order[i]))
    return [dataset[i] for i in local_share(picks)]


def paligemma_batch(examples: list[Example], tokenizer: Tokenizer, size: int, device) -> dict[str, torch.Tensor]:
    """Images and `[bos prefix] ["\\n"] [suffix eos]` texts as model inputs and masks [B, ...]."""
    batch = pad_batch([encode_example(tokenizer, e.prefix, e.suffix) for e in examples])  # [B, T] each
    batch["pixel_values"] = preprocess([e.image for e in examples], size)  # [B, 3, S, S]
    return {k: v.to(device) for k, v in batch.items()}


def paligemma_step_loss(model: nn.Module, batch: dict[str, torch.Tensor], image_tokens: int,
                        autocast: bool) -> tuple[torch.Tensor, int]:
    """The suffix loss of one batch (per example, then mean), and how many tokens it read."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(batch["pixel_values"], batch["input_ids"], batch["mask_ar"], batch["mask_input"])
    loss = prefix_lm_loss(logits.float(), batch["input_ids"], batch["mask_loss"])
    return loss, int(batch["mask_input"].sum()) + image_tokens * batch["input_ids"].shape[0]


class CausalLM(nn.Module):
    """Stage 0's language-model pretraining of the decoder: every real token predicts the next."""

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.llm = llm

    def forward(self, input_ids: torch.Tensor, mask_input: torch.Tensor) -> torch.Tensor:
        mask = make_attn_mask(torch.ones_like(input_ids), mask_input)  # causal, padding hidden
        positions = (torch.cumsum(mask_input, dim=1) - 1).clamp(min=0)  # [B, T]
        hidden = self.llm(self.llm.embed_tokens(input_ids), positions, mask)  # [B, T, D]
        return prefix_lm_loss(self.llm.logits(hidden), input_ids, mask_input)


# ---------------------------------------------------------------------------------------------
# Evaluation: greedy answers on each task's fixed held-out set.

def _score(task: str, answers: list[str], examples: list[Example], vqvae) -> float:
    """The task's metric: CIDEr (caption, describe), accuracy (answer, ocr), F1 at IoU 0.5
    (detect), mean IoU (segment)."""
    if task in ("caption", "describe"):
        return cider_d(answers, [[e.suffix] for e in examples])
    if task in ("answer", "ocr"):
        return sum(exact_match(a, e.suffix) for a, e in zip(answers, examples)) / len(examples)
    size = examples[0].image.size[::-1]
    if task == "detect":
        total = None
        for answer, e in zip(answers, examples):
            truth = [TaskObject(label=label, box=box) for label, box in zip(e.labels, e.boxes)]
            counts = count_detections(parse_detections(answer, size), truth)
            total = counts if total is None else total + counts
        precision, recall = total.precision, total.recall
        return 2 * precision * recall / max(precision + recall, 1e-9)
    predictions = []
    for answer, e in zip(answers, examples):
        valid = [o for o in parse_segmentations(answer, size, vqvae) if o.valid]
        predictions.append(valid[0].mask if valid else None)
    return mean_iou(predictions, [e.masks[0] for e in examples])


METRIC_NAMES = {"caption": "CIDEr", "describe": "CIDEr", "answer": "accuracy", "ocr": "accuracy",
                "detect": "F1@0.5", "segment": "mIoU"}


def evaluate(model: PaliGemma, tokenizer: Tokenizer, world: World, size: int, n: int, vqvae,
             tasks=TASKS) -> dict[str, float]:
    """Each task's metric on its first n held-out scenes, greedy decoding at `size` px."""
    model.eval()
    results = {}
    for task in tasks:
        examples = world.eval_set(task, size, n)
        longest = max(len(tokenizer.encode(e.suffix)) for e in examples) + 2
        answers = generate(model, tokenizer, [e.image for e in examples], [e.prefix for e in examples],
                           max_new_tokens=longest)
        results[task] = _score(task, answers, examples, vqvae)
    model.train()
    return results


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """Stages as rows, tasks as columns."""
    tasks = [t for t in TASKS if any(t in r for r in rows.values())]
    head = f"{'stage':<10}" + "".join(f"{t + ' ' + METRIC_NAMES[t]:>20}" for t in tasks)
    lines = [head] + [f"{stage:<10}" + "".join(f"{r[t]:>20.3f}" if t in r else f"{'-':>20}" for t in tasks)
                      for stage, r in rows.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The stages.

def _save_stage_model(model: PaliGemma, tokenizer: Tokenizer, folder: Path) -> None:
    """A finished stage's model as a transformers folder with its tokenizer: `load()` reads it.
    write_hf_folder writes config.json last, so its presence marks the stage as done."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder / "tokenizer.model")
    write_hf_folder(to_hf_state_dict(model), model.config, folder)


class Trainer:
    """Runs the stages of one recipe into one output folder; every stage skips itself when its
    model is already there and resumes from its checkpoint when it was interrupted."""

    def __init__(self, recipe: Recipe, out: Path, seed: int = 0, device=None, fsdp: bool = False,
                 stop_after: int | None = None):
        self.recipe, self.out, self.seed, self.fsdp = recipe, Path(out), seed, fsdp
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast = recipe.dtype == "bfloat16" and self.device.type == "cuda"
        self.stop_after = stop_after  # for tests: stop every fit after this many steps
        self.rank = rank_and_world()[0]
        self.metrics: dict[str, dict[str, float]] = {}

    # ----- helpers
    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def stage_dir(self, stage: int) -> Path:
        return self.out / f"stage{stage}"

    def model_config(self, image_size: int, **text_changes) -> PaliGemmaConfig:
        return PaliGemmaConfig(vision=replace(self.recipe.vision, image_size=image_size),
                               text=replace(self.recipe.text, vocab_size=self.tokenizer.vocab_size, **text_changes))

    def load_stage(self, stage: int) -> PaliGemma:
        return load(self.stage_dir(stage) / "model", dtype=torch.float32).to(self.device)

    def finish_stage(self, stage: int, model: PaliGemma, losses: list[float], evaluate_at: int | None) -> None:
        """Evaluate, write metrics, loss curve and model (rank 0), then wait for every rank."""
        folder = self.stage_dir(stage)
        if self.fsdp and dist.is_initialized():  # gather the shards into a plain model on rank 0
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank == 0:
                model = PaliGemma(model.config)
                model.load_state_dict(state)
        if self.rank == 0:
            if losses:
                plot_losses(losses, folder / "loss.png", f"stage {stage}")
            if evaluate_at is not None:
                self.metrics[f"stage {stage}"] = evaluate(model, self.tokenizer, self.world, evaluate_at,
                                                          self.recipe.eval_examples, self.vqvae)
                (folder / "metrics.json").write_text(json.dumps(self.metrics[f"stage {stage}"], indent=1))
                self.log(metrics_table(self.metrics))
            _save_stage_model(model, self.tokenizer, folder / "model")
        self._barrier()

    def done(self, stage: int) -> bool:
        metrics = self.stage_dir(stage) / "metrics.json"
        if (self.stage_dir(stage) / "model" / "config.json").exists():
            if metrics.exists():
                self.metrics[f"stage {stage}"] = json.loads(metrics.read_text())
            self.log(f"stage {stage}: already done, skipped")
            return True
        return False

    def paligemma_fit(self, model: PaliGemma, stage: int, steps: int, groups: list[ParamGroup],
                      next_batch: Callable[[int], list[Example]], size: int) -> list[float]:
        """Train a PaliGemma on batches next_batch(t) at `size` px."""
        image_tokens = model.config.num_image_tokens

        def loss_fn(trained, t):
            batch = paligemma_batch(next_batch(t), self.tokenizer, size, self.device)
            return paligemma_step_loss(trained, batch, image_tokens, self.autocast)

        return fit(model, groups, loss_fn, steps, self.stage_dir(stage) / "checkpoint.safetensors",
                   f"stage {stage}", self.recipe.checkpoint_every, self.fsdp, self.stop_after)

    # ----- stage 0
    def prepare(self) -> None:
        """The tokenizer, the VQ-VAE and the world that uses both (stage 0's first two parts)."""
        r, folder = self.recipe, self.stage_dir(0)
        folder.mkdir(parents=True, exist_ok=True)
        if self.rank == 0 and not (folder / "tokenizer.model").exists():
            self.log("stage 0: training the tokenizer on the world's text")
            train_tokenizer(World(self.seed, r.world).text_corpus(3000), r.tokenizer_pieces, folder / "tokenizer.model")
        if self.rank == 0 and not (folder / "vqvae.safetensors").exists():
            self.log("stage 0: training the mask VQ-VAE on the world's masks")
            torch.manual_seed(self.seed)
            vqvae = train_vqvae(World(self.seed, r.world).mask_batches(32), r.vqvae_steps, TINY_CONFIG, seed=self.seed)
            save_vqvae(vqvae, folder / "vqvae.safetensors")
        self._barrier()
        self.tokenizer = Tokenizer.from_file(folder / "tokenizer.model")
        self.vqvae = load_vqvae(folder / "vqvae.safetensors")
        self.world = World(self.seed, r.world, segment_target=partial(mask_to_target, vqvae=self.vqvae))

    def stage0(self) -> None:
        """SigLIP-style image encoder and language-model decoder, then the two joined."""
        if self.done(0):
            return
        r, folder, size = self.recipe, self.stage_dir(0), self.recipe.low_res
        cfg = self.model_config(size)
        torch.manual_seed(self.seed)
        siglip = SigLIP(SigLIPEncoder(cfg.vision), TextEncoder(cfg.vision, cfg.text.vocab_size, 64, cfg.vision.width),
                        cfg.vision.width).to(self.device)

        def siglip_loss(trained, t):
            examples = world_examples(self.world, size, {"caption": 1.0}, r.batch_size, 0, t)
            ids = [self.tokenizer.encode(e.suffix) + [self.tokenizer.eos_id] for e in examples]
            lengths = torch.tensor([len(x) for x in ids], device=self.device)
            padded = torch.tensor([x + [0] * (max(lengths) - len(x)) for x in ids], device=self.device)
            pixels = preprocess([e.image for e in examples], size).to(self.device)
            return trained(pixels, padded, lengths), int(lengths.sum()) + len(ids) * cfg.num_image_tokens

        groups = [ParamGroup("siglip", list(siglip.parameters()), r.lr, partial(cosine_schedule, total=r.siglip_steps))]
        losses = fit(siglip, groups, siglip_loss, r.siglip_steps, folder / "siglip.safetensors", "stage 0 SigLIP",
                     r.checkpoint_every, stop_after=self.stop_after)
        if self.rank == 0:
            plot_losses(losses, folder / "siglip_loss.png", "stage 0 SigLIP")

        torch.manual_seed(self.seed)
        lm = CausalLM(PaliGemma(cfg).llm).to(self.device)
        corpus = self.world.text_corpus(4000)

        def lm_loss(trained, t):
            texts = local_share([corpus[(t * r.batch_size + j) % len(corpus)] for j in range(r.batch_size)])
            batch = pad_batch([encode_example(self.tokenizer, *text.split("\n", 1)) for text in texts])
            ids, real = batch["input_ids"].to(self.device), batch["mask_input"].to(self.device)
            return trained(ids, real), int(real.sum())

        groups = [ParamGroup("llm", list(lm.parameters()), r.lr, partial(cosine_schedule, total=r.lm_steps))]
        lm_losses = fit(lm, groups, lm_loss, r.lm_steps, folder / "lm.safetensors", "stage 0 LM",
                        r.checkpoint_every, stop_after=self.stop_after)

        model = PaliGemma(cfg).to(self.device)
        model.vision.load_state_dict(siglip.image.state_dict())
        model.llm.load_state_dict(lm.llm.state_dict())
        nn.init.zeros_(model.projector.weight)  # big_vision's zero-initialised head (P1 §3.1)
        nn.init.zeros_(model.projector.bias)
        self.finish_stage(0, model, lm_losses, evaluate_at=None)

    # ----- stages 1 and 2
    def stage1(self) -> None:
        """Multimodal pretraining at the low resolution; slow linear warm-up of the encoder."""
        if self.done(1):
            return
        r = self.recipe
        model = self.load_stage(0).train()
        main = partial(rsqrt_schedule, warmup=r.warmup_steps, timescale=r.rsqrt_timescale)
        groups = [ParamGroup("img", [*model.vision.parameters(), *model.projector.parameters()], r.lr,
                             lambda t: main(t) * slow_warmup(t, r.vision_warmup_steps)),
                  ParamGroup("llm", list(model.llm.parameters()), r.lr, main)]
        losses = self.paligemma_fit(model, 1, r.stage1_steps, groups, partial(
            world_examples, self.world, r.low_res, STAGE1_MIXTURE, r.batch_size, 0), r.low_res)
        self.finish_stage(1, model, losses, evaluate_at=r.low_res)

    def stage2(self) -> None:
        """The higher resolution: positions resampled, mixture re-weighted, rsqrt continued."""
        if self.done(2):
            return
        r = self.recipe
        model = at_resolution(self.load_stage(1), r.high_res).to(self.device).train()
        offset = r.stage1_steps  # the schedule and the data stream continue after stage 1
        main = partial(rsqrt_schedule, warmup=r.warmup_steps, timescale=r.rsqrt_timescale)
        groups = [ParamGroup("all", list(model.parameters()), r.lr, lambda t: main(t + offset))]
        losses = self.paligemma_fit(model, 2, r.stage2_steps, groups, partial(
            world_examples, self.world, r.high_res, STAGE2_MIXTURE, r.batch_size, offset), r.high_res)
        self.finish_stage(2, model, losses, evaluate_at=r.high_res)

    # ----- stage 3
    def stage3(self, task: str, freeze_vision: bool = False, init: Path | None = None,
               data: Path | None = None) -> None:
        """Transfer to one task (or to a JSONL dataset): cosine schedule, final soft-cap off."""
        if self.done(3):
            return
        r = self.recipe
        base = load(init, dtype=torch.float32) if init is not None else self.load_stage(2)
        if init is not None:
            if base.tokenizer is None:
                raise ValueError(f"{init}: no tokenizer.model beside the weights; transfer needs it")
            self.tokenizer = base.tokenizer
        cfg = replace(base.config, text=replace(base.config.text, final_softcap=None))
        model = PaliGemma(cfg).to(self.device)
        model.load_state_dict(base.state_dict())
        size = cfg.vision.image_size
        if freeze_vision:
            model.vision.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [ParamGroup("all", trainable, r.transfer_lr, partial(cosine_schedule, total=r.stage3_steps))]
        if data is not None:
            dataset = JsonlDataset(data)
            next_batch = partial(jsonl_examples, dataset, r.batch_size, seed=self.seed)
        else:
            next_batch = partial(world_examples, self.world, size, {task: 1.0}, r.batch_size, 10**6)
        losses = self.paligemma_fit(model.train(), 3, r.stage3_steps, groups, next_batch, size)
        self.finish_stage(3, model, losses, evaluate_at=None if data is not None else size)


def run(recipe: str | Recipe, out, stages=(0, 1, 2, 3), task: str | None = None, seed: int = 0, device=None,
        freeze_vision: bool = False, init=None, data=None, fsdp: bool = False) -> dict[str, dict[str, float]]:
    """Run the given stages of a recipe into `out`; return the held-out metrics per stage."""
    if init is not None and data is None:
        raise ValueError("--init transfers official weights to a dataset of your own: give --data too")
    init_distributed()
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    trainer = Trainer(recipe, Path(out), seed, device, fsdp)
    started = time.time()
    if init is None:  # the world's tokenizer and VQ-VAE; a transfer from official weights needs neither
        trainer.prepare()
    if init is None:
        for stage in (0, 1, 2):
            if stage in stages:
                getattr(trainer, f"stage{stage}")()
    if 3 in stages:
        trainer.stage3(task or recipe.transfer_task, freeze_vision, Path(init) if init else None,
                       Path(data) if data else None)
    trainer.log(f"done in {time.time() - started:.0f} s; held-out metrics per stage:\n{metrics_table(trainer.metrics)}")
    return trainer.metrics
