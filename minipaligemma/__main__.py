"""The command line: `python -m minipaligemma COMMAND ...`.

    generate  an image and a prompt in, the answer streamed out
    convert   big_vision .npz <-> transformers folder, bit for bit
    inspect   what a checkpoint holds: format, config, dtype, parameters per part

Each command is a small function over the package's public API; `--help` on any of them
lists its options.
"""

import argparse
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from .checkpoint import config_from_bigvision, config_from_hf, convert, load, read_checkpoint
from .generate import generate, greedy, sample
from .image import load_image
from .paligemma import PaliGemma
from .tasks import draw, parse_detections, parse_segmentations
from .vqvae import load_vqvae

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cmd_generate(args) -> None:
    """Answer a prompt about an image, printing the answer as it is generated."""
    model = load(args.weights, dtype=DTYPES[args.dtype], device=args.device)
    if model.tokenizer is None:
        raise ValueError(f"{args.weights}: no tokenizer.model beside the weights")
    image = load_image(args.image)
    if args.temperature > 0:
        sampler = partial(sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          generator=torch.Generator(model.llm.embed.weight.device).manual_seed(args.seed))
    else:
        sampler = greedy
    ids: list[int] = []
    printed = ""

    def stream(row: int, token: int) -> None:  # print the text that each new token adds
        nonlocal printed
        ids.append(token)
        text = model.tokenizer.decode(ids)
        print(text[len(printed):], end="", flush=True)
        printed = text

    answer = generate(model, model.tokenizer, [image], [args.prompt], max_new_tokens=args.max_new_tokens,
                      sampler=sampler, beam_size=args.beam, on_token=None if args.beam else stream)[0]
    print(answer if args.beam else "")
    if args.draw:
        size = (image.height, image.width)
        if args.prompt.startswith("segment"):
            vqvae_path = args.vqvae or Path(args.weights).parent / "vae-oid.npz"
            objects = parse_segmentations(answer, size, load_vqvae(vqvae_path))
        else:
            objects = parse_detections(answer, size)
        draw(image, [o for o in objects if o.valid]).save(args.draw)
        print(f"drew {sum(o.valid for o in objects)} object(s) on {args.draw}")


def cmd_train(args) -> None:
    """The stages of a training recipe; see minipaligemma/train.py."""
    from .train import run  # the trainer's imports are heavier than the other commands need
    stages = tuple(int(s) for s in args.stages.split(","))
    run(args.preset, args.out, stages=stages, task=args.task, seed=args.seed, device=args.device,
        freeze_vision=args.freeze_vision, init=args.init, data=args.data, fsdp=args.fsdp)


def cmd_inspect(args) -> None:
    """Print a checkpoint's format, inferred config, dtype and parameter counts per part."""
    fmt, tensors, config_json = read_checkpoint(Path(args.path))
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    cfg = config_from_hf(shapes, config_json) if fmt == "hf" else config_from_bigvision(shapes)
    with torch.device("meta"):
        model = PaliGemma(cfg)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    print(f"format      {'transformers (safetensors)' if fmt == 'hf' else 'big_vision (.npz)'}")
    print(f"dtype       {', '.join(dtypes)}")
    print(f"tensors     {len(tensors)}")
    for part in ("vision", "projector", "llm"):
        count = sum(p.numel() for p in getattr(model, part).parameters())
        print(f"{part:<11} {count:>15,} parameters")
    print(f"{'total':<11} {sum(p.numel() for p in model.parameters()):>15,} parameters")
    print(f"vision      {asdict(cfg.vision)}")
    print(f"text        {asdict(cfg.text)}")


def cmd_convert(args) -> None:
    """Convert SRC to DST (an .npz DST gets big_vision's layout, anything else a transformers folder)."""
    convert(args.src, args.dst)
    print(f"wrote {args.dst}")


def cmd_bench(args) -> None:
    """Time ours against transformers on the same weights: a table, then one line of JSON."""
    from .bench import bench  # imports the trainer, and transformers when it runs
    command = f"python -m minipaligemma bench --config {args.config} --device {args.device}"
    for option in ("repeats", "threads", "peak_tflops"):
        if getattr(args, option) is not None:
            command += f" --{option.replace('_', '-')} {getattr(args, option)}"
    bench(args.config.split(","), args.device, args.repeats, args.peak_tflops, args.threads, command)


def cmd_plan(args) -> None:
    """Print the planned memory of one training step; see minipaligemma/plan.py."""
    from .lora import DEFAULT_TARGETS
    from .plan import plan  # traces a step on fake tensors: imports only this command needs
    targets = tuple(args.lora_targets.split(",")) if args.lora_targets else DEFAULT_TARGETS
    print(plan(args.preset, args.batch, args.text_len, lora=args.lora, qlora=args.qlora,
               checkpoint_activations=args.checkpoint_activations, optimizer=args.optimizer, dtype=args.dtype,
               lora_targets=targets, device=args.device).table())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minipaligemma", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("generate", help="answer a prompt about an image, streamed")
    p.add_argument("--weights", required=True, help="a checkpoint load() reads, with tokenizer.model beside it")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True, help='e.g. "caption en", "detect cat", "answer en what is this?"')
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--beam", type=int, default=None, help="beam search with this many beams")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--draw", help="save the image with the detected boxes (or segmented masks) drawn on it")
    p.add_argument("--vqvae", help="mask VQ-VAE for segment answers (default: vae-oid.npz beside the weights)")
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("train", help="the three-stage trainer (plus stage 0)")
    p.add_argument("--preset", default="tiny", help="tiny (a CPU, minutes) or small (one GPU, about an hour)")
    p.add_argument("--out", required=True, help="output folder, e.g. runs/tiny; rerunning resumes")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--task", default=None, help="the stage 3 transfer task (default: the preset's, ocr)")
    p.add_argument("--freeze-vision", action="store_true", help="stage 3: freeze the image encoder")
    p.add_argument("--init", help="stage 3 from official weights (needs --data)")
    p.add_argument("--data", help="stage 3 on a JSONL dataset of {image, prefix, suffix}")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model (FSDP2) instead of DDP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("inspect", help="what a checkpoint holds")
    p.add_argument("path", help="a transformers folder or .safetensors file, or a big_vision .npz")
    p.set_defaults(run=cmd_inspect)

    p = commands.add_parser("convert", help="big_vision .npz <-> transformers folder")
    p.add_argument("src")
    p.add_argument("dst", help="ends in .npz for big_vision's layout, else a transformers folder")
    p.set_defaults(run=cmd_convert)

    p = commands.add_parser("bench", help="ours vs transformers: prefill, decode, memory, training step")
    p.add_argument("--config", default="tiny",
                   help="tiny, full-width, 3b-bf16, small (comma-separated), or all (the device's set)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default: per config)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's peak bf16 TFLOP/s for MFU (default: looked up by device name)")
    p.set_defaults(run=cmd_bench)

    p = commands.add_parser("plan", help="memory of a training step: parameters, gradients, optimizer, activations")
    p.add_argument("--preset", required=True, help="e.g. paligemma2-3b-224 (the resolution is part of the name)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=128, help="text tokens per example (prompt and answer)")
    p.add_argument("--lora", type=int, default=None, help="LoRA rank (default: full fine-tuning)")
    p.add_argument("--lora-targets", help="comma-separated TOWER.ROLE (default: llm.attn,llm.mlp), see lora.py")
    p.add_argument("--qlora", action="store_true", help="LoRA on a 4-bit base")
    p.add_argument("--checkpoint-activations", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="whose optimizer update path to plan")
    p.set_defaults(run=cmd_plan)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
