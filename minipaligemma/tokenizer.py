r"""The tokenizer: Gemma's SentencePiece model plus PaliGemma's <loc>/<seg> tokens, and the prompt
layout with its masks.

Vocabulary layout (docs/architecture.md §5). Ids 0..3 are pad, eos, bos, unk. The plain SentencePiece pieces
fill ids 0..base-1 (base = 256000 for Gemma). PaliGemma appends 1024 location tokens and 128
segmentation tokens as USER_DEFINED pieces, so each is always one token:

    <locNNNN>  (NNNN = 0000..1023)  id = base + NNNN          official: 256000..257023
    <segNNN>   (NNN  = 000..127)    id = base + 1024 + NNN    official: 257024..257151

A model file without them (the plain Gemma tokenizer, or one we train) gets them appended at
load time, in that order. SentencePiece keeps its model in a protobuf message whose pieces are a
repeated field, and protobuf reads the records of a repeated field in the order they appear,
wherever they appear. So appending serialized piece records to the end of the file appends
pieces to the vocabulary: a few lines of wire format, no dependency on the protobuf package.

Tokenizers for tiny models are trained in-process (`train_tokenizer`) with Gemma's settings:
byte-pair encoding, byte fallback (any character encodes, as UTF-8 bytes if need be), digits
split, no text normalisation, no dummy "▁" prefix, whitespace kept as is, and "\n" a single
piece. The same layout follows with a small base, the plain vocabulary size. Because nothing is
normalised, `decode(encode(text)) == text` for every string without the character "▁" (U+2581),
which SentencePiece uses to stand for a space.

Prompt layout (big_vision; docs/sequence-and-masks.md §1-§2), per example:

    [bos prefix]  ["\n"]  [suffix eos]      "\n" tokenized on its own, never merged
     mask_ar   0 ...  0     0     1 ...  1     0 = bidirectional prefix block, 1 = causal step
     mask_loss 0 ...  0     0     1 ...  1     loss on the suffix and its eos only

For decoding there is no suffix: `[bos prefix] ["\n"]`, all mask_ar 0. A batch is padded on the
right with token 0 (pad), mask_ar 1, mask_loss 0 and mask_input 0 (mask_input 1 = real token).

Two files hold the same tokenizer. `tokenizer.model` is the SentencePiece model itself;
`tokenizer.json` is the fast-tokenizer format that transformers writes (and the one file some
checkpoint folders carry). For Gemma it describes a BPE model: the vocabulary (piece -> id),
the merges in priority order, which pieces are special, and byte fallback. `from_json`
converts it back into a SentencePiece model and loads that, rather than tokenizing with the
`tokenizers` library: one engine then does all the tokenizing, whichever file was read, so
both give the same ids by construction and `save` writes a `tokenizer.model` either way; and
no dependency is added. The conversion (`_sentencepiece_from_json`) is the inverse of
transformers' Gemma converter:

    tokenizer.json                       SentencePiece piece
    model.vocab  piece -> id             piece at that id, in id order
    added token, special                 CONTROL (pad, eos, bos, ...)
    added token, not special             USER_DEFINED ("\n", <loc>, <seg>): always one token
    model.unk_token                      UNKNOWN
    <0x00>..<0xFF> with byte_fallback    BYTE
    other pieces                         NORMAL, score -(rank of the first merge making it)

SentencePiece's BPE merges, at each step, the adjacent pair whose merged piece scores
highest; transformers wrote the merges sorted by that score, so a piece's first merge rank
gives back the order of the scores. Only Gemma's layout is read (BPE, spaces written as "▁",
no dummy prefix, no other normalization); anything else is refused with a message. Tokens
added past the end of the BPE vocabulary (the `<image>` placeholder that transformers'
PaliGemma processor appends at id 257152) are left out: they are not text, and our models put
image embeddings in directly.
"""

from __future__ import annotations

import io
import os
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from .files import BadInput, MissingFile, atomic_write, read_json

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
NUM_LOC_TOKENS = 1024
NUM_SEG_TOKENS = 128
SEPARATOR = "\n"

# How a batch is padded: the value each per-token list gets beyond the end of the example.
PAD_VALUES = {"input_ids": PAD_ID, "mask_ar": 1, "mask_loss": 0, "mask_input": 0}


def loc_token(n: int) -> str:
    """The location token string for bin n (0..1023), e.g. loc_token(7) == "<loc0007>"."""
    return f"<loc{n:04d}>"


def seg_token(n: int) -> str:
    """The segmentation token string for codebook entry n (0..127), e.g. "<seg007>"."""
    return f"<seg{n:03d}>"


# The pieces PaliGemma adds to Gemma, in vocabulary order.
PALIGEMMA_TOKENS = [loc_token(n) for n in range(NUM_LOC_TOKENS)] + [
    seg_token(n) for n in range(NUM_SEG_TOKENS)
]


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint: 7 bits per byte, low bits first, high bit = more bytes follow."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Protobuf fields. A field starts with the varint field_number << 3 | wire_type, where wire
# type 0 is a varint, 2 a length-prefixed run of bytes (a string or a nested message) and 5 a
# 4-byte float.
def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _float_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


# sentencepiece_model.proto: SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def _piece_record(piece: str, piece_type: int, score: float = 0.0) -> bytes:
    """Serialized `ModelProto.pieces` entry (field 1) holding {piece (1), score (2), type (3)};
    a score of 0 (the default) is left out."""
    message = _bytes_field(1, piece.encode("utf-8"))
    if score:
        message += _float_field(2, score)
    return _bytes_field(1, message + _varint_field(3, piece_type))


class Tokenizer:
    """A SentencePiece model with PaliGemma's special-id layout; see the module docstring."""

    def __init__(self, model_proto: bytes):
        """Load a serialized SentencePiece model, appending the <loc>/<seg> pieces if it lacks them.

        A model that SentencePiece cannot read, or with another special-id layout, is BadInput.
        """
        sp = _processor(model_proto)
        ids = [sp.piece_to_id(piece) for piece in PALIGEMMA_TOKENS]
        if all(i == sp.unk_id() for i in ids):  # none present: append them
            model_proto += b"".join(_piece_record(piece, USER_DEFINED) for piece in PALIGEMMA_TOKENS)
            sp = _processor(model_proto)
            ids = [sp.piece_to_id(piece) for piece in PALIGEMMA_TOKENS]
        if ids != list(range(ids[0], ids[0] + len(PALIGEMMA_TOKENS))):
            raise BadInput(
                "the SentencePiece model has some <loc>/<seg> pieces but not all of them in one run "
                "<loc0000>..<loc1023>, <seg000>..<seg127>"
            )
        found = (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id())
        if found != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
            raise BadInput(f"expected Gemma's special ids (pad, eos, bos, unk) = (0, 1, 2, 3), got {found}")
        self.model_proto = model_proto
        self.loc_base = ids[0]
        self._sp = sp

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.model` file (a serialized protobuf; nothing is unpickled)."""
        try:
            return cls(Path(path).read_bytes())
        except FileNotFoundError:
            raise MissingFile(f"{path}: file not found") from None
        except OSError as err:
            raise BadInput(f"{path}: cannot read ({err.strerror or err})") from None
        except BadInput as err:
            raise BadInput(f"{path}: {err}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json` file (Gemma's layout) by converting it to a SentencePiece model."""
        spec = read_json(path)
        try:
            return cls(_sentencepiece_from_json(spec))
        except BadInput as err:
            raise BadInput(f"{path}: {err}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the model, <loc>/<seg> pieces included, as a `tokenizer.model` file (atomically)."""
        atomic_write(path, lambda f: f.write(self.model_proto))

    # Gemma's special ids, checked when the model is loaded.
    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def vocab_size(self) -> int:
        """Number of pieces, <loc>/<seg> included (257152 for the official tokenizer)."""
        return self._sp.get_piece_size()

    def loc_id(self, n: int) -> int:
        """Id of <locNNNN>: base + n."""
        if not 0 <= n < NUM_LOC_TOKENS:
            raise ValueError(f"location bins are 0..{NUM_LOC_TOKENS - 1}, got {n}")
        return self.loc_base + n

    def seg_id(self, n: int) -> int:
        """Id of <segNNN>: base + 1024 + n."""
        if not 0 <= n < NUM_SEG_TOKENS:
            raise ValueError(f"segmentation codes are 0..{NUM_SEG_TOKENS - 1}, got {n}")
        return self.loc_base + NUM_LOC_TOKENS + n

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos or eos. Text that is not Unicode (a lone surrogate,
        as Python makes of bytes that were not UTF-8) is BadInput."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise BadInput(f"the text holds {text[err.start]!r} at character {err.start}, which is not "
                           "Unicode text (bytes that were not UTF-8?)") from None
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list or a 1-D tensor); pad, bos and eos vanish, <loc>/<seg> stay as text.

        SentencePiece renders control pieces (pad, bos, eos) as empty strings and unk as " ⁇ ".
        """
        ids = [int(i) for i in ids]
        outside = [i for i in ids if not 0 <= i < self.vocab_size]
        if outside:
            raise ValueError(f"token ids {outside} are outside the vocabulary of size {self.vocab_size}")
        return self._sp.decode(ids)


def _processor(model_proto: bytes) -> spm.SentencePieceProcessor:
    """A SentencePiece processor of a serialized model, every piece checked to be UTF-8 text
    (SentencePiece loads a model with broken pieces and fails only when it decodes them)."""
    try:
        sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as err:  # SentencePiece reports every malformed model as a RuntimeError
        raise BadInput(f"not a SentencePiece model ({str(err).strip() or 'unreadable protobuf'})") from None
    except UnicodeDecodeError:  # ... whose message quotes a piece, which may not be UTF-8
        raise BadInput("not a SentencePiece model (it refuses a piece that is not UTF-8 text)") from None
    if not sp.serialized_model_proto():  # SentencePiece accepted no model at all (every other call would log)
        raise BadInput("not a SentencePiece model (no pieces)")
    for i in range(sp.get_piece_size()):
        try:
            sp.id_to_piece(i)
        except UnicodeDecodeError:
            raise BadInput(f"not a SentencePiece model: piece {i} is not UTF-8 text") from None
    return sp


def find_tokenizer(folder: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer in `folder`: `tokenizer.model` if there is one, else `tokenizer.json`,
    else None."""
    folder = Path(folder)
    if (folder / "tokenizer.model").exists():
        return Tokenizer.from_file(folder / "tokenizer.model")
    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_json(folder / "tokenizer.json")
    return None


# ---------------------------------------------------------------------------------------------
# tokenizer.json -> SentencePiece model (module docstring).

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _field(spec: dict, key: str, kind: type, where: str = ""):
    """spec[key], which must be a JSON value of the given kind (dict, list or str)."""
    value = spec.get(key)
    if not isinstance(value, kind):
        raise BadInput(f'"{where}{key}" must be a {kind.__name__}, got {value!r:.60}')
    return value


def _check_gemma_text_handling(spec: dict) -> None:
    """Refuse a tokenizer.json that treats text otherwise than Gemma: "▁" for every space, no
    dummy prefix, no normalization. transformers writes either no pre-tokenizer or one that
    splits at " ", of which no " " is left after the normalizer."""
    normalizer = spec.get("normalizer")
    if normalizer != {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}:
        raise BadInput(f"only Gemma's tokenizer.json is read, whose normalizer writes each space as "
                       f'"\u2581" and does nothing else; this one has {normalizer!r:.200}')
    pre_tokenizer = spec.get("pre_tokenizer")
    no_op_split = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
    if pre_tokenizer not in (None, no_op_split):
        raise BadInput(f"only Gemma's tokenizer.json is read, which splits no words before BPE; "
                       f"this one has the pre_tokenizer {pre_tokenizer!r:.200}")


def _sentencepiece_from_json(spec: object) -> bytes:
    """A serialized SentencePiece BPE model equal to a Gemma-style tokenizer.json (module docstring)."""
    if not isinstance(spec, dict):
        raise BadInput(f"expected a JSON object, got {type(spec).__name__}")
    model = _field(spec, "model", dict)
    if model.get("type") != "BPE":
        raise BadInput(f'only Gemma\'s BPE tokenizer.json is read; "model.type" is {model.get("type")!r:.60}')
    _check_gemma_text_handling(spec)
    vocab = _field(model, "vocab", dict, "model.")
    pieces: list[str | None] = [None] * len(vocab)
    for piece, i in vocab.items():
        if not isinstance(i, int) or not 0 <= i < len(vocab) or pieces[i] is not None:
            raise BadInput(f'"model.vocab" must number its {len(vocab)} pieces 0..{len(vocab) - 1}, '
                           f"each once; {piece!r:.60} has id {i!r:.20}")
        pieces[i] = piece

    first_merge: dict[str, int] = {}
    for rank, merge in enumerate(_field(model, "merges", list, "model.")):
        pair = merge.split(" ") if isinstance(merge, str) else merge  # "a b" (older files) or ["a", "b"]
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p in vocab for p in pair)
                and pair[0] + pair[1] in vocab):
            raise BadInput(f'"model.merges" entry {rank} ({merge!r:.60}) is not two pieces of the vocabulary '
                           "that make a third")
        first_merge.setdefault(pair[0] + pair[1], rank)

    types = {}
    for token in _field(spec, "added_tokens", list):
        if not (isinstance(token, dict) and isinstance(token.get("id"), int) and isinstance(token.get("content"), str)):
            raise BadInput(f'every "added_tokens" entry needs an integer "id" and a string "content", '
                           f"got {token!r:.80}")
        if token["id"] >= len(pieces):
            continue  # past the BPE vocabulary, like <image> (module docstring)
        if not 0 <= token["id"] or pieces[token["id"]] != token["content"]:
            raise BadInput(f'added token {token["content"]!r:.60} has id {token["id"]}, which the vocabulary '
                           "gives another piece")
        types[token["id"]] = CONTROL if token.get("special") else USER_DEFINED
    unk = _field(model, "unk_token", str, "model.")
    if unk not in vocab:
        raise BadInput(f'"model.unk_token" {unk!r:.60} is not in the vocabulary')
    types[vocab[unk]] = UNKNOWN
    byte_fallback = model.get("byte_fallback") is True
    if len(pieces) < 4:
        raise BadInput(f"the vocabulary has {len(pieces)} pieces, fewer than Gemma's four special ones")

    records = []
    for i, piece in enumerate(pieces):
        piece_type = types.get(i, BYTE if byte_fallback and _BYTE_PIECE.fullmatch(piece) else NORMAL)
        score = -float(first_merge.get(piece, len(first_merge) + i)) if piece_type == NORMAL else 0.0
        records.append(_piece_record(piece, piece_type, score))
    bpe = 2  # sentencepiece_model.proto: TrainerSpec.ModelType.BPE
    trainer_spec = (_varint_field(3, bpe) + _varint_field(4, len(pieces)) + _varint_field(35, int(byte_fallback))
                    + b"".join(_varint_field(field, i) for field, i in ((40, UNK_ID), (41, BOS_ID), (42, EOS_ID),
                                                                        (43, PAD_ID)))
                    + b"".join(_bytes_field(field, pieces[i].encode("utf-8"))
                               for field, i in ((45, UNK_ID), (46, BOS_ID), (47, EOS_ID), (48, PAD_ID))))
    # identity normalization: no dummy "▁" prefix, whitespace kept as is, spaces escaped as "▁"
    normalizer_spec = _bytes_field(1, b"identity") + _varint_field(3, 0) + _varint_field(4, 0) + _varint_field(5, 1)
    return b"".join(records) + _bytes_field(2, trainer_spec) + _bytes_field(3, normalizer_spec)


def train_tokenizer(texts: Iterable[str], base_vocab_size: int, path: str | os.PathLike) -> Tokenizer:
    r"""Train a small Gemma-style BPE tokenizer on `texts`, save it to `path` and return it.

    `base_vocab_size` counts the plain pieces (specials, "\n", 256 byte pieces, merges); the
    <loc>/<seg> pieces follow, so the final vocab_size is base_vocab_size + 1152. SentencePiece
    raises if the texts cannot fill base_vocab_size pieces and says what the maximum is.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=base_vocab_size,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=[SEPARATOR],
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        minloglevel=2,  # errors only
    )
    tokenizer = Tokenizer(model.getvalue())
    tokenizer.save(path)
    return tokenizer


def encode_example(tokenizer: Tokenizer, prefix: str, suffix: str | None = None) -> dict[str, list[int]]:
    r"""One example in big_vision's layout: lists `input_ids`, `mask_ar`, `mask_loss`, `mask_input`.

    With a suffix (training): [bos prefix] ["\n"] [suffix eos]; mask_ar and mask_loss are 0 on the
    prompt and 1 on suffix + eos. Without (decoding): [bos prefix] ["\n"], all masks 0 but
    mask_input. "\n" is tokenized separately so it never merges with its neighbours.
    """
    prompt = [BOS_ID] + tokenizer.encode(prefix) + tokenizer.encode(SEPARATOR)
    answer = [] if suffix is None else tokenizer.encode(suffix) + [EOS_ID]
    steps = [0] * len(prompt) + [1] * len(answer)
    return {
        "input_ids": prompt + answer,
        "mask_ar": steps,
        "mask_loss": list(steps),  # same values as mask_ar in this layout, but its own list
        "mask_input": [1] * len(steps),
    }


def pad_batch(
    examples: Sequence[dict[str, list[int]]], text_len: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad examples from `encode_example` to one length: long tensors [B, T].

    T is `text_len` when given (an example longer than it is a ValueError, never a silent cut),
    else the longest example. Pad values are in PAD_VALUES. (big_vision pads training text to
    text_len + 1 tokens, so that text_len remain after shifting inputs against targets.)
    """
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    lengths = [len(example["input_ids"]) for example in examples]
    length = max(lengths) if text_len is None else text_len
    for i, n in enumerate(lengths):
        if n > length:
            raise ValueError(
                f"example {i} has {n} tokens, more than text_len={length}; "
                "prompts are never cut: shorten the text or raise text_len"
            )
    return {
        key: torch.tensor(  # [B, T]
            [example[key] + [pad] * (length - len(example[key])) for example in examples], dtype=torch.long
        )
        for key, pad in PAD_VALUES.items()
    }


def encode_batch(
    tokenizer: Tokenizer,
    prefixes: Sequence[str],
    suffixes: Sequence[str] | None = None,
    text_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Prefixes (and suffixes, for training) -> padded tensors [B, T], as `pad_batch` returns."""
    if suffixes is not None and len(suffixes) != len(prefixes):
        raise ValueError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes")
    suffixes = [None] * len(prefixes) if suffixes is None else suffixes
    examples = [encode_example(tokenizer, prefix, suffix) for prefix, suffix in zip(prefixes, suffixes)]
    return pad_batch(examples, text_len)
