"""Checkpoint files and the entry points: read, check, load, convert, write.

The files are transformers' safetensors (one file, or a folder sharded with
model.safetensors.index.json, with its config.json), big_vision's .npz, and our quantized
checkpoints (one safetensors file of codes and scales whose header states the config and the
quantization, docs/checkpoints.md §9). Nothing here
unpickles: safetensors, and numpy with allow_pickle=False; a damaged file is one
CheckpointError naming it. `read_checkpoint` returns a file's format and tensors, `config_of`
its config (checkpoint_config.py), `check_checkpoint` makes every check of `load` against that
config without allocating a model (layouts.py), which is what `python -m minipaligemma
inspect` runs. `load` then copies the tensors into a model (and quantizes it if asked);
`convert` writes one official format as the other, bit for bit, or a quantized checkpoint.
See docs/checkpoints.md §2.3 (the folder), §3.1 (the file), §5 (dtypes), §6 (another
resolution), §8 (safety) and §9 (quantized checkpoints).
"""

import json
import math
import shutil
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .checkpoint_config import config_from_bigvision, config_from_header, config_from_hf, config_to_header, hf_config_dict
from .config import PaliGemmaConfig
from .files import BadInput, atomic_write, read_json
from .layouts import (CheckpointError, bigvision_to_hf_vocab, bounded, canonical_hf_key, check_bigvision_params,
                      check_hf_state_dict, copy_into, hf_key_map, hf_to_bigvision_vocab, listing, renamed,
                      to_bigvision)
from .paligemma import PaliGemma
from .quantize import SCHEMES, load_quantized_state_dict, quantization_of, quantize_model, quantized_state_dict
from .siglip import resample_pos_embed
from .tokenizer import find_tokenizer


# ---------------------------------------------------------------------------------------------
# Files. Nothing here unpickles: safetensors, and numpy with allow_pickle=False. Whatever a
# damaged file makes the parsing libraries raise becomes one CheckpointError naming the file.

def _npy_header(member) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of one .npy member of an .npz, read before its data."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    else:  # 2.0 and 3.0 share a layout (3.0 allows UTF-8 field names, which weights never have)
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    return shape, dtype


def _npz_arrays(archive: zipfile.ZipFile, path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz archive, each header checked before its data is read: arrays
    that are not numbers (pickled Python objects above all) are refused unread, and a header
    that promises more (or fewer) bytes than the member holds is refused before any memory is
    reserved for it."""
    arrays, not_numbers = {}, []
    for info in archive.infolist():
        key = info.filename.removesuffix(".npy")
        with archive.open(info) as member:
            shape, dtype = _npy_header(member)
            data_bytes = info.file_size - member.tell()
        if dtype.hasobject:
            not_numbers.append(f"{key} (Python objects, which would have to be unpickled)")
            continue
        if dtype.kind not in "biufc" and dtype != np.dtype("V2"):  # V2: bfloat16, which numpy cannot name
            not_numbers.append(f"{key} ({dtype})")
            continue
        if math.prod(shape) * dtype.itemsize != data_bytes:
            raise CheckpointError(f"{path}: array {key} claims shape {list(shape)} of {dtype} "
                                  f"({math.prod(shape) * dtype.itemsize} bytes) but holds {data_bytes} bytes")
        with archive.open(info) as member:
            arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
    if not_numbers:
        raise CheckpointError(f"{path}: arrays that hold no numbers: {bounded(not_numbers)}; this package never "
                              "unpickles, and weights are float arrays")
    return arrays


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """big_vision arrays from an .npz; bfloat16 arrays (stored as 2-byte void) come back as bfloat16,
    other numbers as the torch dtype of the same name (integers too: the loaders refuse them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = _npz_arrays(archive, path)
    except (BadInput, MemoryError):
        raise
    except Exception as err:  # zipfile, zlib and numpy raise a dozen types for truncated or corrupt files
        raise CheckpointError(f"{path}: not a readable big_vision .npz (truncated or corrupt?): "
                              f"{type(err).__name__}: {err}") from None
    tensors = {}
    for key, array in arrays.items():
        if array.dtype == np.dtype("V2"):
            tensors[key] = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensors[key] = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))  # native order
    return tensors


def write_npz(params: dict[str, torch.Tensor], path: Path) -> None:
    """Write big_vision arrays as an .npz, bfloat16 as 2-byte void exactly as the official files."""
    arrays = {}
    for key, t in params.items():
        t = t.detach().cpu().contiguous()
        arrays[key] = t.view(torch.int16).numpy().view("V2") if t.dtype == torch.bfloat16 else t.numpy()
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def read_safetensors_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors under their stored names, the metadata strings) of one safetensors file.

    A missing, truncated or corrupt file is a CheckpointError naming it. The reader for every
    safetensors file of the package, training checkpoints included.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        with safe_open(path, "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except MemoryError:
        raise
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata strings of a safetensors file's header, without reading its tensors."""
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, keys in canonical transformers spelling."""
    return renamed(read_safetensors_file(path)[0], canonical_hf_key, str(path))


def _shard_names(index: Path) -> list[str]:
    """The shard files that model.safetensors.index.json names, each checked to be in its folder."""
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f'{index}: expected {{"weight_map": {{tensor name: shard file name}}}}')
    names = sorted(set(weight_map.values()))
    outside = [name for name in names if Path(name).name != name or name in ("", ".", "..")]
    if outside:
        raise CheckpointError(f"{index}: shard names must be file names in the index's folder, got {listing(outside)}")
    return names


def read_hf_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors (canonical keys) and config.json (or None) of a transformers checkpoint folder,
    one file or sharded with model.safetensors.index.json. A tensor in two shards is an error."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = _shard_names(index)
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json in this folder")
    tensors, shard_of = {}, {}
    for name in files:
        for key, value in read_safetensors(path / name).items():
            if key in tensors:
                raise CheckpointError(f"{path}: the tensor {key!r} is in two shards, {shard_of[key]} and {name}")
            tensors[key], shard_of[key] = value, name
    config = path / "config.json"
    return tensors, (read_json(config) if config.exists() else None)


def to_hf_state_dict(model: PaliGemma) -> dict[str, torch.Tensor]:
    """Our parameters under the published hub names (vision_tower.vision_model.*,
    language_model.model.*), which every transformers version loads; lm_head is tied, so omitted."""
    params = model.state_dict()
    hub = {"vision_tower.": "vision_tower.vision_model.", "language_model.": "language_model.model.",
           "multi_modal_projector.": "multi_modal_projector."}
    out = {}
    for ours, theirs in hf_key_map(model).items():
        prefix = next(p for p in hub if theirs.startswith(p))
        out[hub[prefix] + theirs.removeprefix(prefix)] = params[ours].detach().contiguous()
    return out


def write_hf_folder(tensors: dict[str, torch.Tensor], cfg: PaliGemmaConfig, path: Path) -> None:
    """A transformers checkpoint folder: model.safetensors and config.json."""
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "model.safetensors", lambda f: f.write(safetensors_bytes(tensors, metadata={"format": "pt"})))
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config = dict(hf_config_dict(cfg), dtype=dtype)
    atomic_write(path / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))


# ---------------------------------------------------------------------------------------------
# Quantized checkpoints (docs/checkpoints.md §9): one safetensors file of our state dict (codes,
# scales, zero points, the float norms and biases) whose header says what the codes are.

QUANTIZATION_HEADER = "minipaligemma.quantization"  # JSON: {"scheme", "group_size", "modules"}
CONFIG_HEADER = "minipaligemma.config"  # JSON: our config whole (checkpoint_config.config_to_header)


def quantized_file(path: Path) -> Path | None:
    """The safetensors file of a quantized checkpoint that `path` names (the file itself, or a
    folder's model.safetensors), or None for any other checkpoint. Reads the header only."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if file.suffix != ".safetensors" or not file.is_file():
        return None
    return file if QUANTIZATION_HEADER in safetensors_metadata(file) else None


def stored_quantization(path) -> dict | None:
    """The quantization a quantized checkpoint states (quantization_header), read from its
    header alone; None for any other checkpoint (or no file at all: `load` says so)."""
    file = quantized_file(Path(path))
    return None if file is None else quantization_header(safetensors_metadata(file), str(file))


def quantization_header(header: dict[str, str], source: str) -> dict:
    """The quantization a quantized checkpoint's header states, checked: a known scheme, an
    even group size of at least 2 (null for int8), and a non-empty list of module paths."""
    try:
        stated = json.loads(header[QUANTIZATION_HEADER])
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{source}: the header's quantization is not valid JSON ({err})") from None
    if not isinstance(stated, dict) or set(stated) != {"scheme", "group_size", "modules"}:
        raise CheckpointError(f'{source}: the header\'s quantization must be a JSON object with "scheme", '
                              f'"group_size" and "modules", got {header[QUANTIZATION_HEADER]!r:.80}')
    scheme, group_size, modules = stated["scheme"], stated["group_size"], stated["modules"]
    if scheme not in SCHEMES:
        raise CheckpointError(f"{source}: unknown quantization scheme {scheme!r:.20}; this version reads "
                              f"{', '.join(SCHEMES)}")
    groups_ok = group_size is None if scheme == "int8" else (
        isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 2 and group_size % 2 == 0)
    if not groups_ok:
        expected = "null (int8 has one scale per output channel)" if scheme == "int8" else "an even integer >= 2"
        raise CheckpointError(f"{source}: the header's group_size is {group_size!r:.20}, expected {expected}")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise CheckpointError(f"{source}: the header's modules must be a non-empty list of module paths")
    return stated


def quantized_skeleton(config: PaliGemmaConfig, quantization: dict, dtype: torch.dtype, kernel: str,
                       source: str) -> PaliGemma:
    """A model on the meta device (no memory) quantized as a checkpoint's header says, to load
    its tensors into; its quantized modules must be exactly those the header lists."""
    with torch.device("meta"):
        model = PaliGemma(config).to(dtype)
        quantize_model(model, quantization["scheme"], quantization["group_size"] or 64,
                       include_embedding="llm.embed" in quantization["modules"], kernel=kernel)
    ours, listed = set(quantization_of(model)["modules"]), set(quantization["modules"])
    if ours != listed:
        raise CheckpointError(f"{source}: the header lists quantized modules this model does not quantize "
                              f"{listing(sorted(listed - ours))} and omits ones it does {listing(sorted(ours - listed))}")
    return model


def write_quantized(model: PaliGemma, path: Path) -> None:
    """A quantized model as one safetensors file (atomically): its state dict, and in the
    header its quantization and its config."""
    header = {"format": "pt", QUANTIZATION_HEADER: json.dumps(quantization_of(model)),
              CONFIG_HEADER: config_to_header(model.config)}
    atomic_write(path, lambda f: f.write(safetensors_bytes(quantized_state_dict(model), metadata=header)))


# ---------------------------------------------------------------------------------------------
# The entry points.

def empty_model(cfg: PaliGemmaConfig, dtype: torch.dtype, device="cpu") -> PaliGemma:
    """A model whose tensors are allocated but not initialised (built on the meta device, so no
    time goes into random initialisation): for a loader that fills every one."""
    with torch.device("meta"):
        model = PaliGemma(cfg)
    return model.to_empty(device=device).to(dtype)


def read_checkpoint(path: Path) -> tuple[str, dict[str, torch.Tensor], dict | None]:
    """(format, tensors, config) of a checkpoint: "hf" (a transformers folder or file; config:
    its config.json or None), "npz" (config None) or "quantized" (config: the file's header)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    file = quantized_file(path)
    if file is not None:
        tensors, config_json = read_safetensors_file(file)
        fmt = "quantized"
    elif path.is_dir():
        fmt, (tensors, config_json) = "hf", read_hf_folder(path)
    elif path.suffix == ".safetensors":
        fmt, tensors, config_json = "hf", read_safetensors(path), None
    elif path.suffix == ".npz":
        tensors = renamed(read_npz(path), lambda k: k.removeprefix("params/"), str(path))
        fmt, config_json = "npz", None
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format; expected a transformers folder, "
                              ".safetensors or a big_vision .npz")
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return fmt, tensors, config_json


def config_of(fmt: str, tensors: dict[str, torch.Tensor], config_json: dict | None, source: str) -> PaliGemmaConfig:
    """The config of a checkpoint that `read_checkpoint` returned: from config.json and the
    shapes, or from a quantized checkpoint's header."""
    if fmt == "quantized":
        if CONFIG_HEADER not in config_json:
            raise CheckpointError(f"{source}: a quantized checkpoint without its config ({CONFIG_HEADER}) in the header")
        return config_from_header(config_json[CONFIG_HEADER], source)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return config_from_hf(shapes, config_json, source) if fmt == "hf" else config_from_bigvision(shapes, source)


def check_checkpoint(fmt: str, tensors: dict[str, torch.Tensor], config: PaliGemmaConfig,
                     source: str, config_json: dict | None = None) -> dict[str, torch.Tensor]:
    """Every check `load` makes, without allocating a model: raises CheckpointError naming each
    missing, unexpected, mis-shaped or non-float tensor; returns the tensors as our parameters.
    A quantized checkpoint (whose header `config_json` holds) is loaded into a skeleton on the
    meta device, its integer codes checked to be integers of the right type."""
    if fmt == "quantized":
        skeleton = quantized_skeleton(config, quantization_header(config_json, source), _float_dtype(tensors),
                                      "reference", source)
        load_quantized_state_dict(skeleton, tensors, source)
        return tensors
    with torch.device("meta"):
        skeleton = PaliGemma(config)
    check = check_hf_state_dict if fmt == "hf" else check_bigvision_params
    return check(skeleton, tensors, source)


def _float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of a checkpoint's float tensors (a quantized one holds integer codes too)."""
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


def load(path, dtype: torch.dtype | None = None, device=None, config: PaliGemmaConfig | None = None,
         image_size: int | None = None, quantize: str | None = None, group_size: int = 64,
         kernel: str = "reference") -> PaliGemma:
    """Load official-format weights: a transformers folder (one file or sharded, any key
    spelling) or .safetensors file, or a big_vision .npz (float32 or bfloat16); or a quantized
    checkpoint that `convert --quantize` wrote.

    The config comes from `config`, else config.json and the tensor shapes (a quantized
    checkpoint's header). Every tensor is checked before the model is allocated
    (`check_checkpoint`). dtype defaults to the file's (for a quantized checkpoint, the dtype
    of its scales and float tensors). `image_size` runs the model at another resolution,
    resampling the position embeddings. A `tokenizer.model` (or else a `tokenizer.json`) beside
    the weights is loaded as `model.tokenizer` (else None). Returns the model in eval mode.
    Anything wrong with the files is a BadInput naming the file.

    quantize: None, or a scheme of quantize.py ("int8" per output channel, "int4" affine or
    "nf4" in groups of `group_size` inputs) applied after loading to every linear layer of
    both towers, the projector and the tied embedding (norms, biases and the patch embedding
    stay float); `kernel` "reference" (dequantize, then matmul: any device, and trainable) or
    "cpu" (torch's fused kernels, fast with bfloat16 on some CPUs: quantize.fastest_weights).
    A quantized checkpoint loads as it was quantized; asking for another scheme is an error.
    """
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"quantize must be None or one of {SCHEMES}, got {quantize!r}")
    path = Path(path)
    fmt, tensors, config_json = read_checkpoint(path)
    config = config or config_of(fmt, tensors, config_json, str(path))
    if fmt == "quantized":
        model = _load_quantized(tensors, config_json, config, dtype, image_size, quantize, group_size, kernel, str(path))
    else:
        ours = check_checkpoint(fmt, tensors, config, str(path))
        model = empty_model(config, dtype or next(iter(ours.values())).dtype)
        copy_into(model, ours)
        if image_size is not None and image_size != config.vision.image_size:
            model = at_resolution(model, image_size)
        if quantize is not None:
            quantize_model(model, quantize, group_size, kernel=kernel)
    model.tokenizer = find_tokenizer(path if path.is_dir() else path.parent)
    return model.to(device).eval()


def _load_quantized(tensors: dict[str, torch.Tensor], header: dict, config: PaliGemmaConfig, dtype: torch.dtype | None,
                    image_size: int | None, quantize: str | None, group_size: int, kernel: str, source: str) -> PaliGemma:
    """`load` of a quantized checkpoint: a skeleton quantized as the header says, at the asked
    resolution (position embeddings resampled first), then the tensors loaded strictly."""
    stored = quantization_header(header, source)
    asked = None if quantize is None else (quantize, None if quantize == "int8" else group_size)
    if asked is not None and asked != (stored["scheme"], stored["group_size"]):
        raise BadInput(f"{source}: quantized as {stored['scheme']} (group size {stored['group_size']}); quantizing it "
                       f"again as {quantize} would add that error to this one: load it as stored (no quantize), or "
                       f"convert the float checkpoint with --quantize {quantize}")
    if image_size is not None and image_size != config.vision.image_size:
        config = replace(config, vision=replace(config.vision, image_size=image_size))
        if "vision.pos_embed" in tensors:  # (if absent, strict loading names it)
            tensors = dict(tensors, **{"vision.pos_embed": resample_pos_embed(tensors["vision.pos_embed"],
                                                                              config.vision.grid_size)})
    model = quantized_skeleton(config, stored, dtype or _float_dtype(tensors), kernel, source)
    load_quantized_state_dict(model, tensors, source)
    return model


def at_resolution(model: PaliGemma, image_size: int) -> PaliGemma:
    """The same weights in a model for another image size, position embeddings resampled."""
    cfg = replace(model.config, vision=replace(model.config.vision, image_size=image_size))
    state = model.state_dict()
    state["vision.pos_embed"] = resample_pos_embed(state["vision.pos_embed"], cfg.vision.grid_size)
    resized = empty_model(cfg, state["vision.pos_embed"].dtype)
    resized.load_state_dict(state, strict=True)
    return resized


def convert(src, dst, quantize: str | None = None, group_size: int = 64) -> None:
    """Convert between the two official formats: an .npz destination gets big_vision arrays,
    anything else a transformers folder (with the source's tokenizer, if it has one). Values
    and dtype are kept bit for bit. With `quantize` (a scheme of quantize.py, int4 and nf4 in
    groups of `group_size`), the destination is a folder holding a quantized checkpoint
    (model.safetensors, docs/checkpoints.md §9) and the tokenizer.

    Nothing is overwritten, and nothing half-written is left: the folder is written under a
    temporary name beside `dst` and renamed into place when complete (an .npz is written
    atomically).
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise BadInput(f"{dst}: already exists; convert writes a new file or folder and overwrites nothing")
    if quantize is not None and dst.suffix == ".npz":
        raise BadInput(f"{dst}: big_vision's .npz has no quantized layout; name a folder for the quantized checkpoint")
    model = load(src)
    stored = quantization_of(model)
    if stored is not None:
        raise BadInput(f"{src}: already quantized ({stored['scheme']}); convert reads the float checkpoints "
                       "(transformers or big_vision), which it can also quantize")
    if dst.suffix == ".npz":
        params = to_bigvision(model)
        params["llm/embedder/input_embedding"] = hf_to_bigvision_vocab(params["llm/embedder/input_embedding"])
        write_npz(params, dst)
        return
    if quantize is not None:
        quantize_model(model, quantize, group_size)
    else:
        tensors = to_hf_state_dict(model)
        embed = "language_model.model.embed_tokens.weight"
        tensors[embed] = bigvision_to_hf_vocab(tensors[embed])
        cfg = replace(model.config, text=replace(model.config.text, vocab_size=tensors[embed].shape[0]))
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        if quantize is not None:
            write_quantized(model, partial / "model.safetensors")
        else:
            write_hf_folder(tensors, cfg, partial)
        if model.tokenizer is not None:
            model.tokenizer.save(partial / "tokenizer.model")
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
