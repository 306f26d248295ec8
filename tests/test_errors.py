"""Bad input: every reader raises BadInput, whose message names the file, the key (or line) and
what was expected and found; the command line prints it as one line and exits with status 2.

The damaged files are made here by hand (a tensor deleted, reshaped, cast to int; a header
that lies; a shard that is missing), so each expected message follows from the damage done.
The property tests at the end give every reader random, truncated and bit-flipped bytes.
"""

import io
import json
import pickle
import signal
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from minipaligemma import PaliGemma, get_config, load
from minipaligemma.checkpoint import (convert, read_checkpoint, read_safetensors_file, to_hf_state_dict,
                                      write_hf_folder, write_npz)
from minipaligemma.config import PRESETS, PaliGemmaConfig, TextConfig, VisionConfig, check_context
from minipaligemma.data import World
from minipaligemma.files import BadInput, MissingFile, read_json
from minipaligemma.generate import generate
from minipaligemma.image import load_image
from minipaligemma.jsonl import JsonlDataset
from minipaligemma.layouts import CheckpointError, canonical_hf_key, to_bigvision
from minipaligemma.tokenizer import Tokenizer, train_tokenizer
from minipaligemma.vqvae import TINY_CONFIG, MaskVQVAE, load_vqvae, save_vqvae

# A tiny preset whose query scalar is head_dim, so that an .npz (which cannot state it) loads
# back to the same config.
TINY = replace(get_config("tiny"), text=replace(get_config("tiny").text, query_pre_attn_scalar=16))
# Smaller still, for the property tests: most of each file is then its header.
MICRO = PaliGemmaConfig(
    vision=VisionConfig(image_size=16, patch_size=8, width=8, depth=1, mlp_dim=8, num_heads=2),
    text=TextConfig(version=2, vocab_size=8, width=8, depth=2, mlp_dim=8, num_heads=2, num_kv_heads=1,
                    head_dim=4, query_pre_attn_scalar=4))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "minipaligemma", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result, *fragments):
    """Exit status 2, one line `error: ...` holding every fragment, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(World(0).text_corpus(300), 512, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def hf_folder(folder: Path, cfg=TINY, tensors=None) -> Path:
    """A transformers folder of random weights (or of `tensors`), config.json included."""
    torch.manual_seed(0)
    write_hf_folder(to_hf_state_dict(PaliGemma(cfg)) if tensors is None else tensors, cfg, folder)
    return folder


def hf_tensors(cfg=TINY) -> dict:
    torch.manual_seed(0)
    return to_hf_state_dict(PaliGemma(cfg))


def npz_arrays(cfg=TINY) -> dict:
    torch.manual_seed(0)
    return {k: v.numpy() for k, v in to_bigvision(PaliGemma(cfg)).items()}


# ----- checkpoints: every problem named at once ---------------------------------------------

def test_a_missing_first_layer_tensor_is_named_not_a_key_error(tmp_path):
    """The issue's traceback: layer 0's q_proj missing. The sizes come from another layer."""
    tensors = hf_tensors()
    del tensors["language_model.model.layers.0.self_attn.q_proj.weight"]
    folder = hf_folder(tmp_path / "w", tensors=tensors)
    with pytest.raises(CheckpointError) as error:
        load(folder)
    assert str(error.value) == f"{folder}: missing keys ['language_model.layers.0.self_attn.q_proj.weight']"


def test_every_kind_of_problem_in_one_message(tmp_path):
    tensors = hf_tensors()
    del tensors["language_model.model.norm.weight"]
    tensors["language_model.model.extra.weight"] = torch.zeros(3)
    tensors["multi_modal_projector.linear.bias"] = torch.zeros(65)
    tensors["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(64, dtype=torch.int32)
    folder = hf_folder(tmp_path / "w", tensors=tensors)
    with pytest.raises(CheckpointError) as error:
        load(folder)
    assert str(error.value) == (
        f"{folder}: missing keys ['language_model.norm.weight']; "
        "unexpected keys ['language_model.extra.weight']; "
        "multi_modal_projector.linear.bias has shape [65], the model expects [64]; "
        "not floating point: vision_tower.post_layernorm.bias is int32")


def test_many_problems_give_a_bounded_message(tmp_path):
    tensors = {k: v for k, v in hf_tensors().items() if ".layers." not in k or ".layers.1." in k}
    folder = hf_folder(tmp_path / "w", tensors=tensors)  # config.json says 2 layers per tower: layer 0 is gone
    with pytest.raises(CheckpointError) as error:
        load(folder)
    message = str(error.value)
    missing = 16 + 11  # layer 0 of SigLIP (16 tensors) and of Gemma 2 (11)
    assert message.startswith(f"{folder}: missing keys ['language_model.layers.0.")
    assert message.endswith(f" and {missing - 10} more") and message.count("layers.0.") == 10
    assert len(message) < 1000


def test_a_layer_config_json_promises_is_missing(tmp_path):
    """config.json states the layer count, so a whole missing last layer is reported, not ignored."""
    tensors = {k: v for k, v in hf_tensors().items() if "language_model.model.layers.1." not in k}
    with pytest.raises(CheckpointError, match=r"missing keys \['language_model\.layers\.1\.input_layernorm\.weight', "):
        load(hf_folder(tmp_path / "w", tensors=tensors))


def test_integer_npz_embedding_is_refused(tmp_path):
    arrays = npz_arrays()
    arrays["llm/embedder/input_embedding"] = arrays["llm/embedder/input_embedding"].astype(np.int32)
    np.savez(tmp_path / "int.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"int.npz: not floating point: llm/embedder/input_embedding is int32$"):
        load(tmp_path / "int.npz")


def test_a_missing_size_tensor_is_named(tmp_path):
    arrays = npz_arrays()
    del arrays["img/embedding/kernel"]
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"a.npz: missing keys \['img/embedding/kernel'\], from which the "
                                              "model's sizes are read"):
        load(tmp_path / "a.npz")


def test_pickled_arrays_are_named_and_never_unpickled(tmp_path):
    class Alarm:
        def __reduce__(self):  # unpickling this would create the file
            return (Path.touch, (tmp_path / "unpickled",))

    arrays = npz_arrays()
    np.savez(tmp_path / "evil.npz", **arrays, extra=np.array([Alarm()], dtype=object))
    with pytest.raises(CheckpointError, match=r"evil.npz: arrays that hold no numbers: extra \(Python objects"):
        load(tmp_path / "evil.npz")
    assert not (tmp_path / "unpickled").exists()
    assert pickle.loads(pickle.dumps(Alarm())) is None and (tmp_path / "unpickled").exists()  # the alarm works


def test_an_npz_header_that_lies_is_refused_before_allocating(tmp_path):
    """A header claiming 10^12 floats in a member of 40 bytes: refused, nothing allocated."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    member = buffer.getvalue() + b"\0" * 40
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as archive:
        archive.writestr("img/embedding/kernel.npy", member)
    with pytest.raises(CheckpointError, match=r"lie.npz: array img/embedding/kernel claims shape \[1000000000000\] "
                                              r"of float32 \(4000000000000 bytes\) but holds 40 bytes"):
        load(tmp_path / "lie.npz")


def test_sharded_folder_problems(tmp_path):
    folder = hf_folder(tmp_path / "w")
    tensors = hf_tensors()
    keys = sorted(tensors)
    (folder / "model.safetensors").unlink()
    save_file({k: tensors[k] for k in keys[:10]}, folder / "a.safetensors")
    save_file({k: tensors[k] for k in keys[9:]}, folder / "b.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: "a.safetensors" if i < 10 else "b.safetensors"
                                                for i, k in enumerate(keys)}}))
    with pytest.raises(CheckpointError, match=f"the tensor '{canonical_hf_key(keys[9])}' is in two shards, "
                                              "a.safetensors and b.safetensors"):
        load(folder)
    index.write_text(json.dumps({"weight_map": {keys[0]: "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"gone.safetensors: file not found"):
        load(folder)
    index.write_text(json.dumps({"weight_map": {keys[0]: "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"shard names must be file names in the index's folder"):
        load(folder)
    index.write_text('{"weight_map": ')
    with pytest.raises(BadInput, match=r"model.safetensors.index.json: not valid JSON \(Expecting value at line 1"):
        load(folder)


@pytest.mark.parametrize("text_config, message", [
    ('{"head_dim": "16"}', r"config.json text_config.head_dim is '16', expected a positive integer"),
    ('{"max_position_embeddings": 0}', r"text_config.max_position_embeddings is 0, expected a positive integer"),
    ('[1, 2]', r"config.json text_config is \[1, 2\], expected a JSON object"),
])
def test_config_json_fields_of_the_wrong_type(tmp_path, text_config, message):
    folder = hf_folder(tmp_path / "w")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"] = json.loads(text_config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load(folder)


def test_config_json_that_is_not_json(tmp_path):
    folder = hf_folder(tmp_path / "w")
    (folder / "config.json").write_bytes(b'{"text_config": \xff}')
    with pytest.raises(BadInput, match=r"config.json: not UTF-8 text \(byte 0xff at offset 16\)"):
        load(folder)
    (folder / "config.json").write_text("[" * 100_000)
    with pytest.raises(BadInput, match="nested too deeply"):
        load(folder)


def test_an_empty_safetensors_file(tmp_path):
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="empty.safetensors: the file holds no tensors"):
        load(tmp_path / "empty.safetensors")


def test_a_corrupt_training_checkpoint_names_the_file(tmp_path):
    """The reader train.py's resume uses: a truncated file is an error, never a fresh start."""
    save_file({"model/w": torch.ones(100)}, tmp_path / "checkpoint.safetensors", metadata={"trainer_state": "{}"})
    tensors, metadata = read_safetensors_file(tmp_path / "checkpoint.safetensors")
    assert torch.equal(tensors["model/w"], torch.ones(100)) and metadata == {"trainer_state": "{}"}
    data = (tmp_path / "checkpoint.safetensors").read_bytes()
    (tmp_path / "checkpoint.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="checkpoint.safetensors: not a readable safetensors file"):
        read_safetensors_file(tmp_path / "checkpoint.safetensors")


# ----- the context length -------------------------------------------------------------------

def test_context_length_round_trips_through_config_json(tmp_path):
    cfg = replace(TINY, text=replace(TINY.text, max_positions=100))
    folder = hf_folder(tmp_path / "w", cfg=cfg)
    assert json.loads((folder / "config.json").read_text())["text_config"]["max_position_embeddings"] == 100
    assert load(folder).config.text.max_positions == 100
    assert all(c.text.max_positions == 8192 for name, c in PRESETS.items() if name.startswith("paligemma"))


def test_check_context_names_the_numbers():
    check_context(TINY.text, 16, 8192 - 16, "fits exactly")
    with pytest.raises(BadInput, match=r"^row 3: 16 image tokens \+ 8177 text tokens = 8193 positions, more than "
                                       r"the model's context of 8192 \(max_position_embeddings\)$"):
        check_context(TINY.text, 16, 8177, "row 3")


def test_generate_refuses_a_prompt_past_the_context(tokenizer):
    cfg = replace(TINY, text=replace(TINY.text, vocab_size=tokenizer.vocab_size, max_positions=40))
    model = PaliGemma(cfg).eval()
    image = np.zeros((8, 8, 3), np.uint8)
    prompt = "<loc0001>" * 19  # bos + 19 + "\n" = 21 tokens; 16 image tokens + 21 + 3 = 40 fits
    assert len(generate(model, tokenizer, [image], [prompt], max_new_tokens=3)) == 1
    with pytest.raises(BadInput, match=r"prompt 0 \(21 tokens\) with max_new_tokens=4: 16 image tokens \+ 25 text "
                                       r"tokens = 41 positions, more than the model's context of 40"):
        generate(model, tokenizer, [image], [prompt], max_new_tokens=4)
    with pytest.raises(BadInput, match=r"prompt 1 \(21 tokens\) with max_new_tokens=3: 32 image tokens"):
        generate(model, tokenizer, [image, [image, image]], ["a", prompt], max_new_tokens=3)


# ----- convert: nothing half-written --------------------------------------------------------

def test_a_failed_conversion_leaves_nothing(tmp_path):
    tensors = hf_tensors()
    del tensors["language_model.model.norm.weight"]
    src = hf_folder(tmp_path / "src", tensors=tensors)
    out = tmp_path / "out"
    out.mkdir()
    for dst in (out / "model", out / "model.npz"):
        with pytest.raises(CheckpointError, match="missing keys"):
            convert(src, dst)
    assert list(out.iterdir()) == []


def test_conversion_writes_a_whole_folder_and_overwrites_nothing(tmp_path, tokenizer):
    src = tmp_path / "w.npz"
    write_npz(to_bigvision(PaliGemma(replace(TINY, text=replace(TINY.text, vocab_size=tokenizer.vocab_size)))), src)
    tokenizer.save(tmp_path / "tokenizer.model")
    convert(src, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tokenizer.model", "w.npz"]  # no temporary left
    written = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert written == ["config.json", "model.safetensors", "tokenizer.model"]
    assert load(tmp_path / "hf").tokenizer.model_proto == tokenizer.model_proto
    with pytest.raises(BadInput, match="hf: already exists"):
        convert(src, tmp_path / "hf")


# ----- tokenizers, images, VQ-VAE, datasets -------------------------------------------------

def test_tokenizer_files(tmp_path, tokenizer):
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.model_proto[:100])
    with pytest.raises(BadInput, match=r"tokenizer.model: not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "tokenizer.model")
    with pytest.raises(MissingFile, match="absent.model: file not found"):
        Tokenizer.from_file(tmp_path / "absent.model")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(BadInput, match=r"tokenizer.json: only Gemma's BPE tokenizer.json is read; "
                                       "\"model.type\" is 'Unigram'"):
        Tokenizer.from_json(tmp_path / "tokenizer.json")
    with pytest.raises(BadInput, match="at character 1, which is not Unicode text"):
        tokenizer.encode("a\udcff")  # what Python makes of a command-line argument that is not UTF-8


def test_image_files(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:40])
    (tmp_path / "notes.png").write_text("not an image")
    for name in ("cut.png", "notes.png"):
        with pytest.raises(BadInput, match=name):
            load_image(tmp_path / name)
    with pytest.raises(MissingFile, match="absent.png: image file not found"):
        load_image(tmp_path / "absent.png")


def test_vqvae_problems_are_all_named(tmp_path):
    weights = {k: v.numpy() for k, v in MaskVQVAE(TINY_CONFIG).state_dict().items()}
    del weights["decoder.12.weight"]
    weights["decoder.0.bias"] = weights["decoder.0.bias"].astype(np.int64)
    weights["spare"] = np.zeros(2, np.float32)
    with pytest.raises(BadInput, match=r"^state dict: missing tensors: 'decoder.12.weight' \(expected shape "
                                       r"\(1, 8, 1, 1\)\); not floating point: 'decoder.0.bias' is int64; "
                                       r"unexpected tensors: 'spare'$"):
        load_vqvae(weights)


def test_jsonl_rows_are_checked_before_training(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    (tmp_path / "text.png").write_text("not an image")
    row = lambda **fields: json.dumps({"image": "ok.png", "prefix": "caption en", "suffix": "s", **fields})  # noqa: E731
    lines = [row(), row(image="cut.png"), row(image="text.png"), row(image="gone.png"), row(suffix=3),
             row(prefix="\ud800"), "[" * 100_000, row()]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInput) as error:
        JsonlDataset(tmp_path / "d.jsonl")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'd.jsonl'}: 6 bad row(s): line 2: cannot read")
    for number, what in ((2, "cut.png"), (3, "text.png"), (4, "gone.png' not found"), (5, '"suffix" must be a string'),
                         (6, '"prefix" holds a lone surrogate'), (7, "nested too deeply")):
        assert f"line {number}: " in message and what in message.split(f"line {number}: ")[1].split("; line")[0]


def test_jsonl_lists_ten_bad_rows_and_counts_the_rest(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(["{"] * 25) + "\n")
    with pytest.raises(BadInput) as error:
        JsonlDataset(tmp_path / "d.jsonl")
    message = str(error.value)
    assert "25 bad row(s)" in message and "line 10:" in message and "line 11:" not in message
    assert message.endswith("; and 15 more bad row(s)")


# ----- the command line ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_weights(tmp_path_factory, tokenizer):
    """A tiny folder with a tokenizer and a context of 64 positions, and an image beside it."""
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    cfg = replace(TINY, text=replace(TINY.text, vocab_size=tokenizer.vocab_size, max_positions=64))
    hf_folder(folder, cfg=cfg)
    tokenizer.save(folder / "tokenizer.model")
    Image.new("RGB", (8, 8)).save(folder.parent / "in.png")
    return folder


def test_cli_inspect_prints_what_it_read_then_fails(cli_weights, tmp_path):
    tensors = read_checkpoint(cli_weights)[1]
    tensors["language_model.embed_tokens.weight"] = torch.zeros(10, 64, 3)  # the sizes cannot be read
    save_file(tensors, tmp_path / "bad.safetensors")
    result = cli("inspect", tmp_path / "bad.safetensors")
    assert "transformers (safetensors)" in result.stdout and "parameters" not in result.stdout
    assert_one_line_error(result, "bad.safetensors: language_model.embed_tokens.weight has shape [10, 64, 3]")

    tensors = read_checkpoint(cli_weights)[1]
    tensors["language_model.extra"] = torch.zeros(1)
    (tmp_path / "extra").mkdir()
    save_file(tensors, tmp_path / "extra" / "model.safetensors")
    (tmp_path / "extra" / "config.json").write_bytes((cli_weights / "config.json").read_bytes())
    result = cli("inspect", tmp_path / "extra")
    assert "total" in result.stdout and "text " in result.stdout and "check" not in result.stdout
    assert_one_line_error(result, "extra: unexpected keys ['language_model.extra']")
    assert cli("inspect", cli_weights).stdout.endswith("check       ok: every tensor the model needs, with the shape "
                                                       "and dtype it needs\n")


def test_cli_generate_refuses_a_long_prompt(cli_weights):
    result = cli("generate", "--weights", cli_weights, "--image", cli_weights.parent / "in.png",
                 "--prompt", "caption en " + "red " * 10_000, "--max-new-tokens", 4)
    assert_one_line_error(result, "prompt 0 (", "16 image tokens + ", "more than the model's context of 64")


@pytest.mark.parametrize("options, fragment", [
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    (["--draw", "boxes.unknown"], "--draw boxes.unknown: unknown image file extension"),
    (["--beam", 2, "--temperature", 0.5], "--beam and --temperature"),
])
def test_cli_generate_option_mistakes(cli_weights, options, fragment):
    result = cli("generate", "--weights", cli_weights, "--image", cli_weights.parent / "in.png", "--prompt", "ocr",
                 *options)
    assert_one_line_error(result, fragment)


def test_cli_argparse_mistakes_exit_2_too(cli_weights):
    result = cli("generate", "--weights", cli_weights, "--image", "x.png", "--prompt", "ocr", "--max-new-tokens", 0)
    assert_one_line_error(result, "argument --max-new-tokens: must be at least 1, got 0 (python -m minipaligemma "
                                  "generate --help lists the options)")
    assert_one_line_error(cli("train", "--out", "x", "--stages", "1,4"), "expected stages among 0,1,2,3")
    assert_one_line_error(cli("inspect"), "the following arguments are required: path")


def test_cli_tokenizer_json_only(cli_weights, tmp_path):
    """A folder that carries only tokenizer.json generates like one with tokenizer.model."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model with protobuf")
    folder = tmp_path / "json_only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((cli_weights / name).read_bytes())
    transformers.GemmaTokenizer.from_pretrained(str(cli_weights)).save_pretrained(str(tmp_path / "saved"))
    (folder / "tokenizer.json").write_bytes((tmp_path / "saved" / "tokenizer.json").read_bytes())
    assert load(folder).tokenizer.vocab_size == load(cli_weights).tokenizer.vocab_size
    args = ["--image", cli_weights.parent / "in.png", "--prompt", "caption en", "--max-new-tokens", 5]
    with_json = cli("generate", "--weights", folder, *args)
    with_model = cli("generate", "--weights", cli_weights, *args)
    assert with_json.returncode == with_model.returncode == 0, with_json.stderr
    assert with_json.stdout == with_model.stdout


# ----- property tests: damaged bytes give BadInput and nothing else, quickly -----------------

@contextmanager
def within(seconds: float):
    """Fail with TimeoutError if the block runs longer (a hang in Python code, or one in C code
    as soon as it returns to Python)."""
    def alarm(signum, frame):
        raise TimeoutError(f"a reader ran for more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def damaged(valid: bytes):
    """Random bytes, a truncation of `valid`, or `valid` with 1-8 bits flipped (anywhere, or in
    its first or last kilobyte, where headers and zip directories are)."""
    n = len(valid)
    position = st.one_of(st.integers(0, n - 1), st.integers(0, min(n, 1024) - 1), st.integers(max(0, n - 1024), n - 1))

    def flip(flips):
        data = bytearray(valid)
        for i, bit in flips:
            data[i] ^= 1 << bit
        return bytes(data)

    return st.one_of(
        st.binary(max_size=2048),
        st.integers(0, n - 1).map(lambda k: valid[:k]),
        st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=8).map(flip),
    )


def only_bad_input(read, path: Path, data: bytes) -> None:
    """Write `data` to `path` and read it: success or BadInput, nothing else, within 20 s."""
    path.write_bytes(data)
    with within(20):
        try:
            read(path)
        except BadInput:
            pass


FUZZ = settings(max_examples=400, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def micro_files(folder: Path) -> dict[str, bytes]:
    """Valid files of every kind a reader takes, small enough for many examples a second."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = PaliGemma(MICRO)
    write_hf_folder(to_hf_state_dict(model), MICRO, folder / "hf")
    write_npz(to_bigvision(model), folder / "w.npz")
    save_vqvae(MaskVQVAE(TINY_CONFIG), folder / "vqvae.npz")
    save_vqvae(MaskVQVAE(TINY_CONFIG), folder / "vqvae.safetensors")
    tokenizer = train_tokenizer(World(0).text_corpus(100), 400, folder / "tokenizer.model")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / "i.png")
    Image.open(folder / "i.png").save(folder / "i.jpg")
    (folder / "d.jsonl").write_text(json.dumps({"image": "i.png", "prefix": "caption en", "suffix": "x"}) + "\n")
    files = {name: (folder / name).read_bytes() for name in
             ("w.npz", "vqvae.npz", "vqvae.safetensors", "tokenizer.model", "i.png", "i.jpg", "d.jsonl")}
    files["model.safetensors"] = (folder / "hf" / "model.safetensors").read_bytes()
    files["config.json"] = (folder / "hf" / "config.json").read_bytes()
    assert tokenizer.vocab_size > 0
    return files


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("valid")
    return folder, micro_files(folder)


def fresh_hf_folder(valid, tmp_path, name: str) -> Path:
    """A copy of the valid micro folder in which `name` will be damaged."""
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    for other in ("model.safetensors", "config.json"):
        (folder / other).write_bytes(valid[1][other])
    return folder / name


READERS = {  # file name -> the reader the package uses for it
    "w.npz": load,
    "vqvae.npz": load_vqvae,
    "vqvae.safetensors": load_vqvae,
    "tokenizer.model": Tokenizer.from_file,
    "i.png": load_image,
    "i.jpg": load_image,
    "d.jsonl": JsonlDataset,
    "model.safetensors": lambda path: load(path.parent),
    "config.json": lambda path: load(path.parent),
}


def test_the_valid_files_load(valid):
    """The property tests below start from files that every reader accepts."""
    folder, files = valid
    for name, read in READERS.items():
        read(folder / "hf" / name if name in ("model.safetensors", "config.json") else folder / name)


@pytest.mark.parametrize("name", sorted(READERS))
def test_damaged_files_raise_only_bad_input(valid, tmp_path, name):
    folder, files = valid
    if name == "d.jsonl":
        (tmp_path / "i.png").write_bytes(files["i.png"])

    @FUZZ
    @given(data=damaged(files[name]))
    def check(data):
        in_folder = name in ("model.safetensors", "config.json")
        path = fresh_hf_folder(valid, tmp_path, name) if in_folder else tmp_path / name
        only_bad_input(READERS[name], path, data)

    check()


@FUZZ
@given(data=st.one_of(st.binary(max_size=512), st.text(max_size=200).map(str.encode)))
def test_damaged_tokenizer_json_and_training_checkpoints_raise_only_bad_input(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz", numbered=True)
    only_bad_input(Tokenizer.from_json, folder / "tokenizer.json", data)
    only_bad_input(read_safetensors_file, folder / "checkpoint.safetensors", data)
    only_bad_input(read_json, folder / "x.json", data)


def test_damaged_real_tokenizer_json_raises_only_bad_input(tmp_path):
    """Truncations and flips of a tokenizer.json that transformers wrote."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model with protobuf")
    train_tokenizer(World(0).text_corpus(100), 400, tmp_path / "tokenizer.model")
    transformers.GemmaTokenizer.from_pretrained(str(tmp_path)).save_pretrained(str(tmp_path / "saved"))
    valid_json = (tmp_path / "saved" / "tokenizer.json").read_bytes()
    Tokenizer.from_json(tmp_path / "saved" / "tokenizer.json")

    @FUZZ
    @given(data=damaged(valid_json))
    def check(data):
        only_bad_input(Tokenizer.from_json, tmp_path / "tokenizer.json", data)

    check()
