"""Tokenizer tests: special-id layout, <loc>/<seg> ids, round trips, parity with transformers'
GemmaTokenizer, big_vision's prompt layout and masks (expected values derived by hand), and
tokenizer.json read as the same tokenizer."""

import io
import json
import random

import pytest
import sentencepiece as spm
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minipaligemma.files import BadInput
from minipaligemma.tokenizer import (
    Tokenizer,
    encode_batch,
    encode_example,
    loc_token,
    seg_token,
    train_tokenizer,
)

BASE = 400  # plain pieces in the trained test tokenizer: <loc0000> = 400, <seg000> = 1424
NL = 4  # "\n": the trainer puts user-defined symbols right after pad, eos, bos, unk
WORDS = (
    "a the cat dog bird car tree house red blue green yellow big small left right on in under "
    "with and of is are what where how many color photo image picture caption answer detect "
    "segment describe ocr question en fr de sitting running sky water road person people two"
).split()


def corpus(n=300, seed=0):
    """Synthetic task-like sentences, with digits, punctuation, accents and newlines."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 12))]
        words.append(rng.choice(["?", ".", str(rng.randint(0, 999)), "été", "über ; naïve"]))
        sentences.append(" ".join(words) + rng.choice(["", "\n", "\nok"]))
    return sentences


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tokenizer, directory holding tokenizer.model)."""
    directory = tmp_path_factory.mktemp("tok")
    return train_tokenizer(corpus(), BASE, directory / "tokenizer.model"), directory


@pytest.fixture(scope="module")
def tok(trained):
    return trained[0]


@pytest.fixture(scope="module")
def sp_file(trained):
    """The saved file read by sentencepiece itself, an independent view of the layout."""
    return spm.SentencePieceProcessor(model_file=str(trained[1] / "tokenizer.model"))


# Text for the round-trip and parity properties: any unicode that UTF-8 can encode (no lone
# surrogates) except "▁" (SentencePiece's stand-in for a space, which decodes to " "), mixed with
# words and characters of the training texts, <loc>/<seg> strings and newlines.
texts = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(codec="utf-8", exclude_characters="▁"), max_size=12),
        st.text(alphabet="".join(sorted(set("".join(WORDS)))) + " \n", max_size=30),
        st.integers(0, 1023).map(loc_token),
        st.integers(0, 127).map(seg_token),
        st.just("\n"),
    ),
    max_size=6,
).map("".join)


def test_special_ids(tok, sp_file):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [sp_file.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert tok.vocab_size == sp_file.get_piece_size() == BASE + 1024 + 128


def test_loc_and_seg_ids(tok, sp_file):
    for n, piece in [(0, "<loc0000>"), (7, "<loc0007>"), (1023, "<loc1023>")]:
        assert tok.loc_id(n) == BASE + n
        assert sp_file.id_to_piece(BASE + n) == piece
        assert tok.encode(piece) == [BASE + n]
    for n, piece in [(0, "<seg000>"), (42, "<seg042>"), (127, "<seg127>")]:
        assert tok.seg_id(n) == BASE + 1024 + n
        assert sp_file.id_to_piece(BASE + 1024 + n) == piece
        assert tok.encode(piece) == [BASE + 1024 + n]
    with pytest.raises(ValueError, match="0..1023"):
        tok.loc_id(1024)
    with pytest.raises(ValueError, match="0..127"):
        tok.seg_id(-1)


def test_newline_is_one_piece(tok, sp_file):
    assert sp_file.id_to_piece(NL) == "\n"
    assert tok.encode("\n") == [NL]
    assert tok.encode("\n\n") == [NL, NL]
    ids = tok.encode("red car\nblue")
    assert ids.count(NL) == 1 and tok.decode(ids[: ids.index(NL)]) == "red car"


def test_decode_drops_pad_bos_eos_and_keeps_loc_seg(tok):
    ids = [2] + tok.encode("a cat") + [BASE + 5, BASE + 1024 + 9, 1, 0, 0]
    assert tok.decode(ids) == "a cat<loc0005><seg009>"
    assert tok.decode(torch.tensor(ids)) == "a cat<loc0005><seg009>"
    with pytest.raises(ValueError, match=f"outside the vocabulary of size {BASE + 1152}"):
        tok.decode([5, BASE + 1152])


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_space_stand_in_is_the_one_exception(tok):
    assert tok.decode(tok.encode("a▁b")) == "a b"


def test_saved_file_loads_unchanged(tok, trained):
    again = Tokenizer.from_file(trained[1] / "tokenizer.model")
    assert again.vocab_size == tok.vocab_size and again.loc_id(0) == BASE
    assert again.model_proto == tok.model_proto


def plain_model(vocab_size=100, **options):
    """A SentencePiece model trained directly (not by our code), without <loc>/<seg> pieces."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=vocab_size,
        minloglevel=2, **{"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, **options},
    )
    return model.getvalue()


def test_loc_and_seg_appended_at_official_relative_positions(tmp_path):
    plain = plain_model()  # 100 pieces, a unigram model with default settings
    tok = Tokenizer(plain)
    tok.save(tmp_path / "tokenizer.model")
    reread = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    original = spm.SentencePieceProcessor(model_proto=plain)
    assert reread.get_piece_size() == tok.vocab_size == 100 + 1152
    assert [reread.id_to_piece(i) for i in range(100)] == [original.id_to_piece(i) for i in range(100)]
    # official: <locN> = 256000 + N, <segN> = 257024 + N; here the base is 100 instead of 256000
    for offset, piece in [(0, "<loc0000>"), (1023, "<loc1023>"), (1024, "<seg000>"), (1151, "<seg127>")]:
        assert reread.id_to_piece(100 + offset) == piece
    assert (tok.loc_id(17), tok.seg_id(17)) == (117, 100 + 1024 + 17)
    # user-defined pieces: matched whole inside any text (after the "▁" this model puts in front)
    assert reread.encode("<loc0042><seg005>")[-2:] == [142, 1129]


def test_models_with_another_layout_are_rejected():
    with pytest.raises(ValueError, match=r"\(0, 1, 2, 3\)"):
        Tokenizer(plain_model(pad_id=-1, eos_id=2, bos_id=1, unk_id=0))
    with pytest.raises(ValueError, match="not all of them"):
        Tokenizer(plain_model(user_defined_symbols=["<loc0000>"]))


@pytest.fixture(scope="module")
def hf_tokenizer(trained):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model with protobuf")
    return transformers.GemmaTokenizer.from_pretrained(str(trained[1]))


def test_transformers_special_ids(hf_tokenizer):
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.bos_token_id) == (0, 1, 2)
    assert hf_tokenizer.convert_tokens_to_ids(["<loc0005>", "<seg009>", "\n"]) == [BASE + 5, BASE + 1033, NL]


@pytest.mark.parametrize(
    "text",
    [
        "caption en",
        "answer en what color is the car?",
        "detect cat ; dog",
        "<loc0012><loc0345><loc0678><loc1023> cat ; <loc0000><loc0001><loc0002><loc0003> dog",
        "<loc0001><loc0002><loc0003><loc0004><seg000><seg127><seg064> person",
        "two  spaces,\ttab\nnewline\n\nand trailing space ",
        " leading space and 12345 digits 3.14",
        "été über naïve ✓ 日本語 🙂",
        "<loc12345> <loc123> <seg1000> <locabcd>",
        "",
    ],
)
def test_transformers_parity_examples(tok, hf_tokenizer, text):
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == tok.encode(text)


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_transformers_parity_property(tok, hf_tokenizer, text):
    # transformers matches special-token strings written in the text ("<bos>" -> 2); SentencePiece
    # (and big_vision) spells them out character by character. Keep them out of this comparison.
    assume(not any(s in text for s in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")))
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == tok.encode(text)


# Prompt layout. Prefixes and suffixes made of <loc>/<seg> strings have known ids, so the expected
# sequences below are written out by hand: <loc0001> = 401, <loc0002> = 402, <seg003> = 1427.


def test_training_layout(tok):
    example = encode_example(tok, "<loc0001><loc0002>", "<seg003>")
    assert example == {
        "input_ids": [2, 401, 402, NL, 1427, 1],  # bos prefix "\n" suffix eos
        "mask_ar": [0, 0, 0, 0, 1, 1],
        "mask_loss": [0, 0, 0, 0, 1, 1],
        "mask_input": [1, 1, 1, 1, 1, 1],
    }


def test_decoding_layout(tok):
    example = encode_example(tok, "<loc0001><loc0002>")
    assert example == {
        "input_ids": [2, 401, 402, NL],
        "mask_ar": [0, 0, 0, 0],
        "mask_loss": [0, 0, 0, 0],
        "mask_input": [1, 1, 1, 1],
    }


def test_separator_never_merges_with_the_prefix():
    # Gemma's vocabulary also has pieces of several newlines, like "\n\n". A prefix that ends in
    # "\n", tokenized together with the separator, would end in one "\n\n" token; big_vision
    # tokenizes the separator on its own, which gives "\n", "\n".
    tok = Tokenizer(plain_model(user_defined_symbols=["\n", "\n\n"], add_dummy_prefix=False))
    assert (tok.encode("\n"), tok.encode("\n\n")) == ([4], [5])  # placed after pad, eos, bos, unk
    ids = encode_example(tok, "a\n", "b")["input_ids"]
    assert ids == [2, *tok.encode("a"), 4, 4, *tok.encode("b"), 1]


def test_batch_padding(tok):
    batch = encode_batch(tok, ["<loc0001><loc0002>", "<loc0003>"], ["<seg003>", "<seg000>"])
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"].tolist() == [[2, 401, 402, NL, 1427, 1], [2, 403, NL, 1424, 1, 0]]
    assert batch["mask_ar"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert batch["mask_loss"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert batch["mask_input"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]

    batch = encode_batch(tok, ["<loc0001><loc0002>", "<loc0003>"], text_len=6)
    assert batch["input_ids"].tolist() == [[2, 401, 402, NL, 0, 0], [2, 403, NL, 0, 0, 0]]
    assert batch["mask_ar"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert batch["mask_loss"].tolist() == [[0] * 6, [0] * 6]
    assert batch["mask_input"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]


def test_too_long_prompt_is_an_error(tok):
    with pytest.raises(ValueError, match=r"example 1 has 6 tokens, more than text_len=5"):
        encode_batch(tok, ["<loc0001>", "<loc0001><loc0002>"], ["<seg001>", "<seg002>"], text_len=5)
    with pytest.raises(ValueError, match="2 prefixes but 1 suffixes"):
        encode_batch(tok, ["a", "b"], ["c"])


# tokenizer.json: transformers writes it from our tokenizer.model (its Gemma converter); we read
# it back by converting it to a SentencePiece model. Both files must tokenize alike, and so must
# the `tokenizers` library reading the same tokenizer.json (an independent implementation).

FRAGMENTS = {
    "loc/seg": ["<loc0000>", "<loc1023>", "<loc0512>", "<seg000>", "<seg127>", "<seg064>", "<loc12345>", "<seg1000>"],
    "newline": ["\n", "\n\n", "a\nb", "\n "],
    "spaces": [" ", "  ", "   ", " lead", "trail ", "a  b", "\t", " \t "],
    "digits": ["0", "42", "12345", "3.14", "2024-01-01", "007"],
    "emoji": ["🙂", "👍🏽", "🏳️‍🌈", "🚗"],
    "cjk": ["日本語", "中文", "한국어", "かな"],
    "rare": ["\x00", "\x7f", "\u00ad", "𝔘", "\U0010ffff", "é", "ß", "Ω"],  # most fall back to bytes
    "words": WORDS,
}


def varied_strings(n=300, seed=1):
    """n strings, each of 1-6 fragments; the first len(FRAGMENTS) start with one of each kind."""
    rng = random.Random(seed)
    kinds = list(FRAGMENTS)
    strings = []
    for i in range(n):
        parts = [rng.choice(FRAGMENTS[kinds[i % len(kinds)]])]
        parts += [rng.choice(FRAGMENTS[rng.choice(kinds)]) for _ in range(rng.randint(0, 5))]
        rng.shuffle(parts)
        strings.append("".join(parts))
    return strings


@pytest.fixture(scope="module")
def tokenizer_json(trained, tmp_path_factory):
    """tokenizer.json as transformers writes it for our tokenizer.model."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model with protobuf")
    out = tmp_path_factory.mktemp("json")
    transformers.GemmaTokenizer.from_pretrained(str(trained[1])).save_pretrained(str(out))
    return out / "tokenizer.json"


def test_varied_strings_cover_every_kind():
    strings = varied_strings()
    assert len(strings) >= 200
    for kind, fragments in FRAGMENTS.items():
        assert sum(any(f in s for f in fragments) for s in strings) >= 20, kind


def test_tokenizer_json_gives_the_same_ids_layouts_and_text(tok, tokenizer_json):
    from_json = Tokenizer.from_json(tokenizer_json)
    assert (from_json.vocab_size, from_json.loc_base) == (tok.vocab_size, tok.loc_base)
    for text in varied_strings():
        ids = tok.encode(text)
        assert from_json.encode(text) == ids, text
        assert from_json.decode(ids) == tok.decode(ids) == text.replace("▁", " "), text
        assert encode_example(from_json, text, text) == encode_example(tok, text, text)
        assert encode_example(from_json, text) == encode_example(tok, text)


def test_tokenizer_json_agrees_with_the_tokenizers_library(tok, tokenizer_json):
    tokenizers = pytest.importorskip("tokenizers")
    fast = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    from_json = Tokenizer.from_json(tokenizer_json)
    for text in varied_strings():
        assert fast.encode(text, add_special_tokens=False).ids == from_json.encode(text), text


def test_byte_fallback_characters_become_bytes(tok, tokenizer_json):
    from_json = Tokenizer.from_json(tokenizer_json)
    for text in ("𝔘", "日", "🙂"):
        assert from_json.encode(text) == tok.encode(text) == [from_json._sp.piece_to_id(f"<0x{b:02X}>")
                                                                for b in text.encode("utf-8")]


def test_tokenizer_json_beside_the_weights_is_found(tok, tokenizer_json, tmp_path):
    from minipaligemma.tokenizer import find_tokenizer
    assert find_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    assert find_tokenizer(tmp_path).encode("red circle <loc0001>") == tok.encode("red circle <loc0001>")
    plain = Tokenizer(plain_model())  # a tokenizer.model beside it wins
    plain.save(tmp_path / "tokenizer.model")
    assert find_tokenizer(tmp_path).model_proto == plain.model_proto


def test_converted_tokenizer_saves_as_a_tokenizer_model(tok, tokenizer_json, tmp_path):
    Tokenizer.from_json(tokenizer_json).save(tmp_path / "tokenizer.model")
    again = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    pieces = range(tok.vocab_size)
    assert [again.id_to_piece(i) for i in pieces] == [tok._sp.id_to_piece(i) for i in pieces]
    for text in varied_strings(50):
        assert again.encode(text) == tok.encode(text)


def test_tokenizer_json_of_another_layout_is_refused(tokenizer_json, tmp_path):
    spec = json.loads(tokenizer_json.read_text())
    for change, message in [
        (lambda s: s.update(normalizer={"type": "NFKC"}), "only Gemma's tokenizer.json is read, whose normalizer"),
        (lambda s: s["model"]["vocab"].update({"extra": 0}), '"model.vocab" must number its'),
        (lambda s: s["model"]["merges"].append(["<loc0001>", "zz"]), r'"model.merges" entry \d+'),
        (lambda s: s["added_tokens"].append({"id": 5, "content": "<bos>", "special": True}), "gives another piece"),
    ]:
        damaged = json.loads(json.dumps(spec))
        change(damaged)
        (tmp_path / "tokenizer.json").write_text(json.dumps(damaged))
        with pytest.raises(BadInput, match=message):
            Tokenizer.from_json(tmp_path / "tokenizer.json")
    past_the_end = json.loads(json.dumps(spec))  # like PaliGemma's <image>, added by the processor
    past_the_end["added_tokens"].append({"id": len(spec["model"]["vocab"]), "content": "<image>", "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(past_the_end))
    assert Tokenizer.from_json(tmp_path / "tokenizer.json").vocab_size == len(spec["model"]["vocab"])
