"""The command line: `python -m minipaligemma COMMAND ...`.

    generate  an image and a prompt in, the answer streamed out (float or quantized weights)
    convert   big_vision .npz <-> transformers folder, bit for bit; or a quantized checkpoint
    inspect   what a checkpoint holds: format, config, dtype, parameters per part, then every check load makes
    train     the stages of a training recipe (the tiny one runs on a CPU), or a transfer of your weights
    bench     ours against transformers on the same weights: prefill, decode, memory, training step;
              the GPU check in one call (--config gpu)
    plan      the memory of one training step (full, LoRA, QLoRA, activation checkpointing)

Each command is a small function over the package's public API; `--help` on any of them
lists its options. Bad input (a damaged or unusual file, an option out of range, a prompt
longer than the model's context) ends with exit status 2 and one line `error: ...` naming the
file and what is wrong; a bad option is reported the same way. A traceback means a bug.
"""

import argparse
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from PIL import Image

from .checkpoint import (check_checkpoint, config_of, convert, load, quantization_header, read_checkpoint,
                         stored_quantization)
from .files import BadInput, atomic_write
from .generate import generate, greedy, sample
from .image import load_image
from .paligemma import PaliGemma
from .quantize import SCHEMES, fastest_kernel, fastest_weights, in_words
from .tasks import draw, parse_detections, parse_segmentations
from .tokenizer import find_tokenizer
from .vqvae import load_vqvae

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(name: str) -> torch.device:
    """The torch device a --device option names, if this machine has it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInput(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {name}: this machine has no CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"--device {name}: this machine has no MPS device")
    return device


def _drawing_format(path: Path) -> str:
    """The PIL format a --draw file name asks for, checked before anything is computed."""
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise BadInput(f"--draw {path}: unknown image file extension; use .png or .jpg")
    if not path.parent.is_dir():
        raise BadInput(f"--draw {path}: the folder {path.parent} does not exist")
    return image_format


def _weights(args, device: torch.device) -> tuple[torch.dtype, str | None, int]:
    """(dtype, quantization scheme or None, group size) to generate with. What --dtype and
    --quantize say; a quantized checkpoint keeps its own scheme. Left open, the dtype of
    quantized weights is bfloat16 (their kernels are fast with it), and with neither option
    given on float weights, the fastest on this device (quantize.fastest_weights). Whatever
    was chosen for the user is said in one line."""
    stored = stored_quantization(args.weights)
    scheme = args.quantize or (stored and stored["scheme"])
    group_size = stored["group_size"] if stored and not args.quantize else args.group_size
    if args.dtype is not None or args.quantize is not None:
        return DTYPES[args.dtype] if args.dtype else torch.bfloat16 if scheme else torch.float32, scheme, group_size
    if stored is not None:
        dtype, why = torch.bfloat16, "quantized in the file; its layers run fastest with bfloat16 inputs"
    else:
        dtype, scheme, why = fastest_weights(device)
    weights = in_words(scheme, group_size) if scheme else "not quantized"
    print(f"weights: {str(dtype).removeprefix('torch.')}, {weights} ({why}; --dtype and --quantize choose)", flush=True)
    return dtype, scheme, group_size


def cmd_generate(args) -> None:
    """Answer a prompt about an image, printing the answer as it is generated."""
    if args.beam and args.temperature > 0:
        raise BadInput("--beam and --temperature: beam search does not sample; give one or the other")
    device = _device(args.device)  # the cheap checks first, before minutes of loading and decoding
    drawing_format = _drawing_format(Path(args.draw)) if args.draw else None
    image = load_image(args.image)
    dtype, scheme, group_size = _weights(args, device)
    kernel = fastest_kernel(scheme, group_size, device) if scheme else "reference"
    model = load(args.weights, dtype=dtype, device=device, quantize=scheme, group_size=group_size, kernel=kernel)
    if model.tokenizer is None:
        raise BadInput(f"{args.weights}: no tokenizer.model or tokenizer.json beside the weights")
    if args.temperature > 0:
        sampler = partial(sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          generator=torch.Generator(device).manual_seed(args.seed))
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
        drawing = draw(image, [o for o in objects if o.valid])
        atomic_write(args.draw, lambda f: drawing.save(f, format=drawing_format))
        print(f"drew {sum(o.valid for o in objects)} object(s) on {args.draw}")


def cmd_train(args) -> None:
    """The stages of a training recipe; see minipaligemma/train.py."""
    from .lora import DEFAULT_TARGETS
    from .train import RECIPES, Transfer, run  # the trainer's imports are heavier than the other commands need
    if args.preset not in RECIPES:
        raise BadInput(f"--preset {args.preset}: unknown; the recipes are {', '.join(RECIPES)}")
    if args.lora is not None and args.colab:
        raise BadInput("--lora and --colab are two ways of fine-tuning: choose one")
    if args.lora is None and (args.qlora or args.base_dtype):
        raise BadInput("--qlora and --base-dtype concern the frozen base of LoRA: give --lora RANK too")
    device = None if args.device is None else _device(args.device)
    method = ("qlora" if args.qlora else "lora") if args.lora is not None else "colab" if args.colab else "full"
    targets = tuple(args.lora_targets.split(",")) if args.lora_targets else DEFAULT_TARGETS
    transfer = Transfer(method, args.freeze_vision, args.lora or 16, targets, args.base_dtype,
                        args.checkpoint_activations)
    run(args.preset, args.out, stages=args.stages, task=args.task, seed=args.seed, device=device,
        transfer=transfer, init=args.init, data=args.data, fsdp=args.fsdp)


def cmd_inspect(args) -> None:
    """Print a checkpoint's format, inferred config, dtype and parameter counts per part, then
    make every check `load` makes (tokenizer included): what could be read is printed before
    the first problem ends the command."""
    path = Path(args.path)
    fmt, tensors, config_json = read_checkpoint(path)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    formats = {"hf": "transformers (safetensors)", "npz": "big_vision (.npz)", "quantized": "quantized (safetensors)"}
    print(f"format      {formats[fmt]}")
    print(f"dtype       {', '.join(dtypes)}")
    print(f"tensors     {len(tensors)}")
    print(f"bytes       {sum(t.numel() * t.element_size() for t in tensors.values()):,}")
    if fmt == "quantized":
        q = quantization_header(config_json, str(path))
        embedding = "included" if "llm.embed" in q["modules"] else "in float"
        print(f"quantized   {in_words(q['scheme'], q['group_size'])}: {len(q['modules'])} modules, the tied "
              f"embedding {embedding}")
    cfg = config_of(fmt, tensors, config_json, str(path))
    with torch.device("meta"):
        model = PaliGemma(cfg)
    for part in ("vision", "projector", "llm"):
        count = sum(p.numel() for p in getattr(model, part).parameters())
        print(f"{part:<11} {count:>15,} parameters")
    print(f"{'total':<11} {sum(p.numel() for p in model.parameters()):>15,} parameters")
    print(f"vision      {asdict(cfg.vision)}")
    print(f"text        {asdict(cfg.text)}", flush=True)
    check_checkpoint(fmt, tensors, cfg, str(path), config_json)
    tokenizer = find_tokenizer(path if path.is_dir() else path.parent)
    print(f"tokenizer   {'none beside the weights' if tokenizer is None else f'{tokenizer.vocab_size} pieces'}")
    print("check       ok: every tensor the model needs, with the shape and dtype it needs")


def cmd_convert(args) -> None:
    """Convert SRC to DST (an .npz DST gets big_vision's layout, anything else a transformers
    folder, or with --quantize a folder holding a quantized checkpoint)."""
    convert(args.src, args.dst, args.quantize, args.group_size)
    print(f"wrote {args.dst}" + (f" ({in_words(args.quantize, args.group_size)})" if args.quantize else ""))


def cmd_bench(args) -> None:
    """Time ours against transformers on the same weights: a table, then one line of JSON."""
    from .bench import bench  # imports the trainer, and transformers when it runs
    from .gpu_bench import attention_bench, gpu_bench
    from .quant_bench import quantized_bench
    configs = args.config.split(",")
    device = args.device or ("cuda" if configs == ["gpu"] else "cpu")
    command = f"python -m minipaligemma bench --config {args.config} --device {device}"
    for option in ("size", "repeats", "threads", "peak_tflops"):
        if getattr(args, option) is not None:
            command += f" --{option.replace('_', '-')} {getattr(args, option)}"
    if configs in (["gpu"], ["attention"]):
        given = [f"--{o.replace('_', '-')}" for o in ("size", "repeats", "peak_tflops") if getattr(args, o) is not None]
        if given:
            raise BadInput(f"{', '.join(given)}: not an option of --config {args.config} (it measures its own)")
        _device(device)
        (gpu_bench if configs == ["gpu"] else attention_bench)(device, args.threads, command)
    elif "gpu" in configs or "attention" in configs:
        raise BadInput("--config gpu and --config attention run alone")
    elif "quantized" not in configs:
        if args.size is not None:
            raise BadInput("--size is an option of --config quantized")
        bench(configs, device, args.repeats, args.peak_tflops, args.threads, command)
    elif configs != ["quantized"] or device != "cpu":
        raise BadInput("--config quantized runs alone, on the CPU (its fused kernels are CPU kernels)")
    else:
        quantized_bench(args.size or "3b", args.repeats, args.threads, command)


def _at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _group_size(text: str) -> int:
    """An argparse type: a group size of int4 / nf4, an even integer >= 2."""
    value = _at_least(2)(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even (two 4-bit codes a byte), got {value}")
    return value


def _number(low: float, high: float, low_open: bool = False):
    """An argparse type: a float in [low, high], or (low, high] with low_open."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
        return value
    return parse


def _stages(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated stages among 0, 1, 2, 3."""
    stages = tuple(part.strip() for part in text.split(","))
    if not stages or any(part not in ("0", "1", "2", "3") for part in stages):
        raise argparse.ArgumentTypeError(f"expected stages among 0,1,2,3 separated by commas, got {text!r}")
    return tuple(int(part) for part in stages)


class _Parser(argparse.ArgumentParser):
    """argparse, reporting a bad option as one line like every other bad input (status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")


def cmd_plan(args) -> None:
    """Print the planned memory of one training step; see minipaligemma/plan.py."""
    from .lora import DEFAULT_TARGETS
    from .plan import plan  # traces a step on fake tensors: imports only this command needs
    targets = tuple(args.lora_targets.split(",")) if args.lora_targets else DEFAULT_TARGETS
    print(plan(args.preset, args.batch, args.text_len, lora=args.lora, qlora=args.qlora,
               checkpoint_activations=args.checkpoint_activations, optimizer=args.optimizer, dtype=args.dtype,
               lora_targets=targets, device=args.device).table())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m minipaligemma", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("generate", help="answer a prompt about an image, streamed")
    p.add_argument("--weights", required=True,
                   help="a checkpoint load() reads, with tokenizer.model or tokenizer.json beside it")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True, help='e.g. "caption en", "detect cat", "answer en what is this?"')
    p.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    p.add_argument("--temperature", type=_number(0.0, float("inf")), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=_at_least(1), default=None)
    p.add_argument("--top-p", type=_number(0.0, 1.0, low_open=True), default=None)
    p.add_argument("--beam", type=_at_least(1), default=None, help="beam search with this many beams")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: bfloat16 for quantized weights, else float32; with neither --dtype nor "
                        "--quantize, the fastest on this CPU (printed)")
    p.add_argument("--quantize", choices=SCHEMES, default=None,
                   help="quantize the weights after loading (a quantized checkpoint keeps its own)")
    p.add_argument("--group-size", type=_group_size, default=64, help="inputs per scale for int4 and nf4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--draw", help="save the image with the detected boxes (or segmented masks) drawn on it")
    p.add_argument("--vqvae", help="mask VQ-VAE for segment answers (default: vae-oid.npz beside the weights)")
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("train", help="the three-stage trainer (plus stage 0)")
    p.add_argument("--preset", default="tiny", help="tiny (a CPU, minutes) or small (one GPU, about 6 minutes)")
    p.add_argument("--out", required=True, help="output folder, e.g. runs/tiny; rerunning resumes")
    p.add_argument("--stages", type=_stages, default=(0, 1, 2, 3))
    p.add_argument("--task", default=None, help="the stage 3 transfer task (default: the preset's, ocr)")
    p.add_argument("--freeze-vision", action="store_true", help="stage 3: freeze the image encoder")
    p.add_argument("--lora", type=_at_least(1), default=None, metavar="RANK",
                   help="stage 3: train LoRA adapters of this rank only (the exported model is merged)")
    p.add_argument("--lora-targets", default=None,
                   help="with --lora: comma-separated TOWER.ROLE, e.g. llm.attn,vision.q (default llm.attn,llm.mlp)")
    p.add_argument("--qlora", action="store_true",
                   help="with --lora: QLoRA, the base's block weights stored in 4 bits (NF4)")
    p.add_argument("--base-dtype", choices=["float32", "bfloat16"], default=None,
                   help="with --lora: the frozen base's dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--colab", action="store_true",
                   help="stage 3: big_vision's colab recipe (decoder attention weights only, SGD at 0.03)")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="stage 3: recompute each block's activations in the backward pass (less memory)")
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
    p.add_argument("--quantize", choices=SCHEMES, default=None,
                   help="write a quantized checkpoint (a folder) instead, which load() and generate read")
    p.add_argument("--group-size", type=_group_size, default=64, help="inputs per scale for int4 and nf4")
    p.set_defaults(run=cmd_convert)

    p = commands.add_parser("bench", help="ours vs transformers: prefill, decode, memory, training step")
    p.add_argument("--config", default="tiny",
                   help="tiny, full-width, 3b-bf16, small (comma-separated), or all (the device's set); "
                        "or quantized alone: float32, bfloat16, int8 and int4 against transformers; or gpu "
                        "alone: checks, 3B speed, MBU and MFU in 4 minutes (tiny sizes with --device cpu); or "
                        "attention alone: eager, sdpa, flex and compiled decoding")
    p.add_argument("--size", choices=("3b", "tiny"), default=None,
                   help="the model of --config quantized: PaliGemma 2 3B-224 at full depth (default) or tiny")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --config gpu, else cpu)")
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
    """Run one command; bad input is one line on stderr and exit status 2 (as argparse's own)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except BadInput as err:
        print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
