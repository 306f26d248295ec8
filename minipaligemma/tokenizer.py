r"""The tokenizer: Gemma's SentencePiece model plus PaliGemma's <loc>/<seg> tokens, and the prompt
layout with its masks.

Vocabulary layout (spec §1.4). Ids 0..3 are pad, eos, bos, unk. The plain SentencePiece pieces
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

Prompt layout (big_vision, spec §3.1-3.3), per example:

    [bos prefix]  ["\n"]  [suffix eos]      "\n" tokenized on its own, never merged
     mask_ar   0 ...  0     0     1 ...  1     0 = bidirectional prefix block, 1 = causal step
     mask_loss 0 ...  0     0     1 ...  1     loss on the suffix and its eos only

For decoding there is no suffix: `[bos prefix] ["\n"]`, all mask_ar 0. A batch is padded on the
right with token 0 (pad), mask_ar 1, mask_loss 0 and mask_input 0 (mask_input 1 = real token).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm
import torch

from .files import atomic_write

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


def _user_defined_piece_record(piece: str) -> bytes:
    """Serialized `ModelProto.pieces` entry (field 1) holding {piece (field 1), type (field 3)}.

    A protobuf key byte is field_number << 3 | wire_type (2 = length-delimited, 0 = varint);
    the score (field 2) is left at its default, 0.
    """
    text = piece.encode("utf-8")
    user_defined = 4  # sentencepiece_model.proto: SentencePiece.Type.USER_DEFINED
    message = b"\x0a" + _varint(len(text)) + text + b"\x18" + _varint(user_defined)
    return b"\x0a" + _varint(len(message)) + message


class Tokenizer:
    """A SentencePiece model with PaliGemma's special-id layout; see the module docstring."""

    def __init__(self, model_proto: bytes):
        """Load a serialized SentencePiece model, appending the <loc>/<seg> pieces if it lacks them."""
        sp = spm.SentencePieceProcessor(model_proto=model_proto)
        ids = [sp.piece_to_id(piece) for piece in PALIGEMMA_TOKENS]
        if all(i == sp.unk_id() for i in ids):  # none present: append them
            model_proto += b"".join(_user_defined_piece_record(piece) for piece in PALIGEMMA_TOKENS)
            sp = spm.SentencePieceProcessor(model_proto=model_proto)
            ids = [sp.piece_to_id(piece) for piece in PALIGEMMA_TOKENS]
        if ids != list(range(ids[0], ids[0] + len(PALIGEMMA_TOKENS))):
            raise ValueError(
                "the SentencePiece model has some <loc>/<seg> pieces but not all of them in one run "
                "<loc0000>..<loc1023>, <seg000>..<seg127>"
            )
        found = (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id())
        if found != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
            raise ValueError(f"expected Gemma's special ids (pad, eos, bos, unk) = (0, 1, 2, 3), got {found}")
        self.model_proto = model_proto
        self.loc_base = ids[0]
        self._sp = sp

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.model` file (a serialized protobuf; nothing is unpickled)."""
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: str | os.PathLike) -> None:
        """Write the model, <loc>/<seg> pieces included, as a `tokenizer.model` file."""
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
        """Token ids of `text`, without bos or eos."""
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
