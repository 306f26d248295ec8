"""The trainer: PaliGemma's stages, one after another, each resumable (PaliGemma paper,
arXiv 2407.07726, §3.2; the recipe is told in docs/training.md).

    stage 0  unimodal pretraining, at toy scale: a tokenizer trained on the world's text, the
             mask VQ-VAE on its masks, the image encoder with SigLIP's sigmoid loss against a
             small text tower, the decoder as a language model on the world's text (pretrain.py).
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

Every stage trains with `loop.fit` (resumable checkpoints, a JSONL step log), ends with the
held-out evaluation of `evaluate.py`, and draws its pictures with `plots.py`. Each artefact is
written atomically and a finished stage is marked by its exported model folder, so the same
command, run again after any crash, skips what is done and resumes what is not. Under
`torchrun`, processes share each batch (distributed.py); rank 0 alone evaluates and writes.

Files of a run, in `out/`: stageN/checkpoint.safetensors (+ .json, .jsonl), stageN/model/
(a transformers folder with its tokenizer, which `load()` reads), stageN/metrics.json,
stageN/loss.png, and metrics.png (every task's metric after each stage).
"""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from .checkpoint import at_resolution, load, to_hf_state_dict, write_hf_folder
from .config import PaliGemmaConfig, TextConfig, VisionConfig, check_context
from .data import STAGE1_MIXTURE, STAGE2_MIXTURE, Example, World
from .distributed import barrier, init_distributed, local_share, rank_and_world
from .evaluate import evaluate, metrics_table
from .files import BadInput, atomic_write
from .image import preprocess
from .jsonl import JsonlDataset
from .loop import ParamGroup, StepLoss, fit, read_log
from .lora import (DEFAULT_TARGETS, add_lora, dequantize_base, describe_trainable, merge_lora, parse_target,
                   quantize_base, save_lora)
from .paligemma import PaliGemma, checkpoint_blocks
from .plots import save_figure, stage_figure, stages_figure
from .pretrain import CausalLM, SigLIP, TextEncoder
from .scenes import SMALL_WORLD, TINY_WORLD, WorldConfig
from .schedules import cosine_schedule, rsqrt_schedule, slow_warmup
from .siglip import SigLIPEncoder
from .tasks import mask_to_target
from .tokenizer import Tokenizer, encode_example, pad_batch, train_tokenizer
from .vqvae import TINY_CONFIG, load_vqvae, save_vqvae, train_vqvae


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
    lora_lr: float = 3e-3  # LoRA's adapters start at zero and are few: a larger rate than full fine-tuning's
    warmup_steps: int = 20
    vision_warmup_steps: int = 150  # the slow linear warm-up of the image encoder in stage 1
    rsqrt_timescale: int = 100
    eval_examples: int = 48
    checkpoint_every: int = 50
    dtype: str = "float32"
    siglip_pooling: str = "map"  # pretrain.POOLINGS: SigLIP's attention-pooling head, or "mean" to compare
    data_workers: int = 0  # processes that make stages 1-3's batches ahead of the step (0: the trainer makes them)


RECIPES = {
    # A laptop CPU, all stages in minutes. 32 -> 64 px, 8 px patches: 16 -> 64 image tokens.
    "tiny": Recipe(
        vision=VisionConfig(image_size=32, patch_size=8, width=128, depth=3, mlp_dim=256, num_heads=4),
        text=TextConfig(version=2, width=128, depth=3, mlp_dim=384, num_heads=4, num_kv_heads=2, head_dim=32,
                        query_pre_attn_scalar=32),
        world=TINY_WORLD, low_res=32, high_res=64, batch_size=32, tokenizer_pieces=512, vqvae_steps=300,
        siglip_steps=3000, lm_steps=300, stage1_steps=1500, stage2_steps=900, stage3_steps=200,
        vision_warmup_steps=300, rsqrt_timescale=1000,
        eval_examples=256),  # 96 left a kind of question's accuracy uncertain by about 0.1; 256 cost seconds
    # One H100/H200 in bfloat16, sized for about 6 minutes in all: 112 -> 224 px with So400m's 14 px
    # patches (64 -> 256 image tokens). The step counts come from an estimate, not yet a measurement
    # (docs/training.md §8): 3.1 and 9.4 TFLOP per step at 112 and 224 px, taken as 40 and 80 ms.
    # Rendering a batch of 128 scenes at 224 px takes 0.6 s on one CPU core, so 8 processes make
    # the batches ahead of the step.
    "small": Recipe(
        vision=VisionConfig(image_size=112, patch_size=14, width=384, depth=6, mlp_dim=1536, num_heads=6),
        text=TextConfig(version=2, width=512, depth=8, mlp_dim=2048, num_heads=8, num_kv_heads=4, head_dim=64,
                        query_pre_attn_scalar=64),
        world=SMALL_WORLD, low_res=112, high_res=224, batch_size=128, tokenizer_pieces=768, vqvae_steps=500,
        siglip_steps=1000, lm_steps=500, stage1_steps=2500, stage2_steps=1000, stage3_steps=250, lr=5e-4,
        transfer_lr=1e-4, warmup_steps=100, vision_warmup_steps=600, rsqrt_timescale=600, eval_examples=256,
        checkpoint_every=250, dtype="bfloat16", data_workers=8),
}


COLAB_LR = 0.03  # big_vision's fine-tuning colab: SGD at 0.03 on the decoder's attention weights
TRANSFER_METHODS = ("full", "lora", "qlora", "colab")
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Transfer:
    """How stage 3 fine-tunes (docs/training.md §4, §7).

    "full"   every weight (all but the image encoder with freeze_vision); AdamW at the recipe's
             transfer_lr, cosine schedule with 5 % warm-up. The most capable, and the most memory:
             weights, gradients and two AdamW moments of every weight.
    "lora"   the base frozen; LoRA adapters of rank `lora_rank` (alpha = rank) on `lora_targets`
             (lora.py); AdamW at lora_lr. Gradients and optimizer state exist for the adapters
             only, so it fits where full fine-tuning does not. The exported model holds the
             merged weights; adapter.safetensors beside it the adapters alone.
    "qlora"  "lora" on a base whose blocks' linear layers are stored in 4 bits (NF4 in groups of
             64, lora.quantize_base): about a quarter of a bfloat16 base's memory. The exported
             model holds the dequantized weights with the adapters merged.
    "colab"  big_vision's fine-tuning colab, made for a 16 GB T4: only the decoder's attention
             weights train, plain SGD (no optimizer state at all) at 0.03, cosine schedule with
             10 % warm-up. No new parameters, but every attention weight gets a gradient.

    base_dtype ("lora" and "qlora" only): the frozen base's dtype, "float32" or "bfloat16"; None
    means bfloat16 on a GPU, float32 on a CPU (whose bfloat16 matrix products are slow). The
    adapters are float32 whatever it is. checkpoint_activations: every block recomputes its
    activations in the backward pass (paligemma.checkpoint_blocks), any method.
    """

    method: str = "full"
    freeze_vision: bool = False
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    base_dtype: str | None = None
    checkpoint_activations: bool = False

    def __post_init__(self):
        if self.method not in TRANSFER_METHODS:
            raise ValueError(f"transfer method must be one of {TRANSFER_METHODS}, got {self.method!r}")
        for target in self.lora_targets:  # a misspelt target fails here, before any training
            parse_target(target)
        if self.base_dtype is not None and (self.method not in ("lora", "qlora") or self.base_dtype not in BASE_DTYPES):
            raise ValueError(f"base_dtype is the frozen base's dtype under lora or qlora, one of {list(BASE_DTYPES)}; "
                             f"got {self.base_dtype!r} with {self.method!r}")

    @property
    def optimizer(self) -> str:
        """loop.fit's optimizer for this method: plain SGD for the colab recipe, else AdamW."""
        return "sgd" if self.method == "colab" else "adamw"

    def prepare(self, model: PaliGemma, device: torch.device) -> PaliGemma:
        """Make `model` (float32, on `device`) ready to fine-tune this way, in place: what is
        frozen, the base's dtype and quantization, the adapters, the checkpointing. Only the
        parameters that require gradients are handed to the optimizer."""
        if self.freeze_vision:
            model.vision.requires_grad_(False)
        if self.method in ("lora", "qlora"):
            base_dtype = self.base_dtype or ("bfloat16" if device.type == "cuda" else "float32")
            model.to(BASE_DTYPES[base_dtype])
            if self.method == "qlora":
                quantize_base(model)
            add_lora(model, self.lora_rank, self.lora_rank, self.lora_targets)  # float32 adapters
        if self.method == "colab":
            model.requires_grad_(False)
            for layer in model.llm.layers:
                layer.attn.requires_grad_(True)
        if self.checkpoint_activations:
            checkpoint_blocks(model)
        return model


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
    batch["pixel_values"] = preprocess([e.image for e in examples], size)  # [B, 3, R, R], R = size
    return {k: v.to(device) for k, v in batch.items()}


class _StepBatches(torch.utils.data.Dataset):
    """Steps start .. stop - 1 as a dataset: item i is make(start + i), step start + i's batch."""

    def __init__(self, make: Callable[[int], object], start: int, stop: int):
        self.make, self.start, self.stop = make, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        return self.make(self.start + i)


class Prefetched:
    """make(t), called in step order t, t + 1, ..., computed ahead by `workers` processes while
    the model trains on the current step: a DataLoader over step indices, so batch t is still
    make(t) whoever makes it. A call out of order (a resumed run's first step) restarts the
    workers from that step. workers = 0: make(t) in this process, nothing ahead."""

    def __init__(self, make: Callable[[int], object], stop: int, workers: int):
        self.make, self.stop, self.workers = make, stop, workers
        self.upcoming, self.expected = None, None

    def __call__(self, t: int):
        if self.workers == 0:
            return self.make(t)
        if t != self.expected:
            self.upcoming = iter(torch.utils.data.DataLoader(
                _StepBatches(self.make, t, self.stop), batch_size=None, num_workers=self.workers,
                prefetch_factor=4, pin_memory=torch.cuda.is_available()))
        self.expected = t + 1
        return next(self.upcoming)


def step_batch(next_batch: Callable[[int], list[Example]], tokenizer: Tokenizer, size: int,
               t: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Step t's model inputs on the CPU (`paligemma_batch`) and the task of each example."""
    examples = next_batch(t)
    return paligemma_batch(examples, tokenizer, size, "cpu"), [e.task for e in examples]


def paligemma_step_loss(model: nn.Module, batch: dict[str, torch.Tensor], image_tokens: int, autocast: bool,
                        tasks: list[str] | None = None) -> StepLoss:
    """The suffix loss of one batch (per example, then mean), how many tokens it read, and,
    given each example's task, the mean loss of each task (for the step log)."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
        per_example = model(batch["pixel_values"], batch["input_ids"], batch["mask_ar"], batch["mask_input"],
                            mask_loss=batch["mask_loss"])  # [B], from logits at the supervised positions only
    task_losses = None
    if tasks is not None:
        values = per_example.detach().tolist()
        task_losses = {task: sum(v for v, t in zip(values, tasks) if t == task) / tasks.count(task)
                       for task in sorted(set(tasks))}
    tokens = int(batch["mask_input"].sum()) + image_tokens * batch["input_ids"].shape[0]
    return StepLoss(per_example.mean(), tokens, task_losses)


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

    def __init__(self, recipe: Recipe, out: Path, seed: int = 0, device=None, fsdp: bool = False):
        self.recipe, self.out, self.seed, self.fsdp = recipe, Path(out), seed, fsdp
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast = recipe.dtype == "bfloat16" and self.device.type == "cuda"
        self.rank = rank_and_world()[0]
        self.metrics: dict[str, dict[str, float]] = {}

    # ----- helpers
    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def stage_dir(self, stage: int) -> Path:
        return self.out / f"stage{stage}"

    def model_config(self, image_size: int, **text_changes) -> PaliGemmaConfig:
        return PaliGemmaConfig(vision=replace(self.recipe.vision, image_size=image_size),
                               text=replace(self.recipe.text, vocab_size=self.tokenizer.vocab_size, **text_changes))

    def load_stage(self, stage: int) -> PaliGemma:
        """The exported model of a finished stage; a BadInput saying what to run when it is missing."""
        folder = self.stage_dir(stage) / "model"
        if not (folder / "config.json").exists():
            raise BadInput(f"{folder}: stage {stage} has not finished in this output folder; run it first "
                           f"(--stages {','.join(map(str, range(stage + 1)))}) or transfer official weights with --init and --data")
        return load(folder, dtype=torch.float32).to(self.device)

    def finish_stage(self, stage: int, model: PaliGemma, log: Path, evaluate_at: int | None) -> None:
        """Evaluate; write metrics, pictures and the model (rank 0); then wait for every rank.
        `log` is the JSONL step log of the fit whose loss the stage's picture shows."""
        folder = self.stage_dir(stage)
        if self.fsdp and dist.is_initialized():  # gather the shards into a plain model on rank 0
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank == 0:
                model = PaliGemma(model.config)
                model.load_state_dict(state)
        if self.rank == 0:
            metrics = None
            if evaluate_at is not None:
                metrics = evaluate(model, self.tokenizer, self.world, evaluate_at, self.recipe.eval_examples, self.vqvae)
                self.metrics[f"stage {stage}"] = metrics
                atomic_write(folder / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=1).encode()))
                self.log(metrics_table(self.metrics))
                save_figure(stages_figure(self.metrics), self.out / "metrics.png")
            records = read_log(log, float("inf"))
            if records:
                save_figure(stage_figure(records, f"stage {stage}", metrics), folder / "loss.png")
            _save_stage_model(model, self.tokenizer, folder / "model")
        barrier()

    def done(self, stage: int) -> bool:
        metrics = self.stage_dir(stage) / "metrics.json"
        if (self.stage_dir(stage) / "model" / "config.json").exists():
            if metrics.exists():
                self.metrics[f"stage {stage}"] = json.loads(metrics.read_text())
            self.log(f"stage {stage}: already done, skipped")
            return True
        return False

    def paligemma_fit(self, model: PaliGemma, stage: int, steps: int, groups: list[ParamGroup],
                      next_batch: Callable[[int], list[Example]], size: int, optimizer: str = "adamw") -> None:
        """Train a PaliGemma on batches next_batch(t) at `size` px (made ahead by the recipe's
        data_workers, if any)."""
        image_tokens = model.config.num_image_tokens
        batches = Prefetched(partial(step_batch, next_batch, self.tokenizer, size), steps, self.recipe.data_workers)

        def loss_fn(trained, t):
            batch, tasks = batches(t)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            return paligemma_step_loss(trained, batch, image_tokens, self.autocast, tasks)

        fit(model, groups, loss_fn, steps, self.stage_dir(stage) / "checkpoint.safetensors", f"stage {stage}",
            self.recipe.checkpoint_every, self.fsdp, optimizer)

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
        barrier()
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
                        cfg.vision.width, r.siglip_pooling).to(self.device)

        def siglip_loss(trained, t):
            examples = world_examples(self.world, size, {"caption": 1.0}, r.batch_size, 0, t)
            ids = [self.tokenizer.encode(e.suffix) + [self.tokenizer.eos_id] for e in examples]
            lengths = torch.tensor([len(x) for x in ids], device=self.device)
            padded = torch.tensor([x + [0] * (max(lengths) - len(x)) for x in ids], device=self.device)
            pixels = preprocess([e.image for e in examples], size).to(self.device)
            return StepLoss(trained(pixels, padded, lengths), int(lengths.sum()) + len(ids) * cfg.num_image_tokens)

        groups = [ParamGroup("siglip", list(siglip.parameters()), r.lr, partial(cosine_schedule, total=r.siglip_steps))]
        fit(siglip, groups, siglip_loss, r.siglip_steps, folder / "siglip.safetensors", "stage 0 SigLIP",
            r.checkpoint_every)
        if self.rank == 0:
            save_figure(stage_figure(read_log(folder / "siglip.jsonl", r.siglip_steps), "stage 0 SigLIP"),
                        folder / "siglip_loss.png")

        torch.manual_seed(self.seed)
        lm = CausalLM(PaliGemma(cfg).llm).to(self.device)
        corpus = self.world.text_corpus(4000)

        def lm_loss(trained, t):
            texts = local_share([corpus[(t * r.batch_size + j) % len(corpus)] for j in range(r.batch_size)])
            batch = pad_batch([encode_example(self.tokenizer, *text.split("\n", 1)) for text in texts])
            ids, real = batch["input_ids"].to(self.device), batch["mask_input"].to(self.device)
            return StepLoss(trained(ids, real), int(real.sum()))

        groups = [ParamGroup("llm", list(lm.parameters()), r.lr, partial(cosine_schedule, total=r.lm_steps))]
        fit(lm, groups, lm_loss, r.lm_steps, folder / "lm.safetensors", "stage 0 LM", r.checkpoint_every)

        model = PaliGemma(cfg).to(self.device)
        model.vision.load_state_dict(siglip.image.state_dict())
        model.llm.load_state_dict(lm.llm.state_dict())
        nn.init.zeros_(model.projector.weight)  # big_vision's zero-initialised head (PaliGemma paper §3.1)
        nn.init.zeros_(model.projector.bias)
        self.finish_stage(0, model, folder / "lm.jsonl", evaluate_at=None)

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
        self.paligemma_fit(model, 1, r.stage1_steps, groups, partial(
            world_examples, self.world, r.low_res, STAGE1_MIXTURE, r.batch_size, 0), r.low_res)
        self.finish_stage(1, model, self.stage_dir(1) / "checkpoint.jsonl", evaluate_at=r.low_res)

    def stage2(self) -> None:
        """The higher resolution: positions resampled, mixture re-weighted, rsqrt continued."""
        if self.done(2):
            return
        r = self.recipe
        model = at_resolution(self.load_stage(1), r.high_res).to(self.device).train()
        offset = r.stage1_steps  # the schedule and the data stream continue after stage 1
        main = partial(rsqrt_schedule, warmup=r.warmup_steps, timescale=r.rsqrt_timescale)
        groups = [ParamGroup("all", list(model.parameters()), r.lr, lambda t: main(t + offset))]
        self.paligemma_fit(model, 2, r.stage2_steps, groups, partial(
            world_examples, self.world, r.high_res, STAGE2_MIXTURE, r.batch_size, offset), r.high_res)
        self.finish_stage(2, model, self.stage_dir(2) / "checkpoint.jsonl", evaluate_at=r.high_res)

    # ----- stage 3
    def stage3(self, task: str, transfer: Transfer, init: Path | None = None, data: Path | None = None) -> None:
        """Transfer to one task (or to a JSONL dataset) as `transfer` says; final soft-cap off."""
        if self.done(3):
            return
        r = self.recipe
        base = load(init, dtype=torch.float32) if init is not None else self.load_stage(2)
        if init is not None:
            if base.tokenizer is None:
                raise BadInput(f"{init}: no tokenizer.model or tokenizer.json beside the weights; transfer needs it")
            self.tokenizer = base.tokenizer
        cfg = replace(base.config, text=replace(base.config.text, final_softcap=None))
        model = PaliGemma(cfg).to(self.device)
        model.load_state_dict(base.state_dict())
        size = cfg.vision.image_size
        transfer.prepare(model, self.device)  # before fit, which may resume the adapters from a checkpoint
        lr, schedule = r.transfer_lr, partial(cosine_schedule, total=r.stage3_steps)
        if transfer.method in ("lora", "qlora"):
            lr = r.lora_lr
        if transfer.method == "colab":
            lr, schedule = COLAB_LR, partial(cosine_schedule, total=r.stage3_steps, warmup_fraction=0.1)
        self.log(f"stage 3: {transfer.method} fine-tuning, {describe_trainable(model)}")
        groups = [ParamGroup("all", [p for p in model.parameters() if p.requires_grad], lr, schedule)]
        if data is not None:
            dataset = JsonlDataset(data)
            for number, _, prefix, suffix in dataset.rows:  # every row fits the context, checked before training
                tokens = len(encode_example(self.tokenizer, prefix, suffix)["input_ids"])
                check_context(cfg.text, cfg.num_image_tokens, tokens, f"{data} line {number}")
            next_batch = partial(jsonl_examples, dataset, r.batch_size, seed=self.seed)
        else:
            next_batch = partial(world_examples, self.world, size, {task: 1.0}, r.batch_size, 10**6)
        self.paligemma_fit(model.train(), 3, r.stage3_steps, groups, next_batch, size, transfer.optimizer)
        if transfer.method in ("lora", "qlora"):
            if self.rank == 0:
                save_lora(model, self.stage_dir(3) / "adapter.safetensors")
            merge_lora(dequantize_base(model.float()))  # a plain float32 model, whatever the base was
        self.finish_stage(3, model, self.stage_dir(3) / "checkpoint.jsonl", evaluate_at=None if data is not None else size)


def run(recipe: str | Recipe, out, stages=(0, 1, 2, 3), task: str | None = None, seed: int = 0, device=None,
        transfer: Transfer = Transfer(), init=None, data=None, fsdp: bool = False) -> dict[str, dict[str, float]]:
    """Run the given stages of a recipe into `out`; return the held-out metrics per stage."""
    if init is not None and data is None:
        raise BadInput("--init transfers official weights to a dataset of your own: give --data too")
    init_distributed()
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    trainer = Trainer(recipe, Path(out), seed, device, fsdp)
    started = time.time()
    if init is None:  # the world's tokenizer and VQ-VAE; a transfer from official weights needs neither
        trainer.prepare()
        for stage, run_stage in ((0, trainer.stage0), (1, trainer.stage1), (2, trainer.stage2)):
            if stage in stages:
                run_stage()
    if 3 in stages:
        trainer.stage3(task or recipe.transfer_task, transfer, Path(init) if init else None,
                       Path(data) if data else None)
    trainer.log(f"done in {time.time() - started:.0f} s; held-out metrics per stage:\n{metrics_table(trainer.metrics)}")
    return trainer.metrics
