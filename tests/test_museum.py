"""The bug museum (minipaligemma/museum.py, docs/bug-museum.md): each bug is caught by the tool
named for it, a tool that passes on the correct model; each documented symptom is measured; and
each exercise check of notebook 6 accepts the reference solution and rejects realistic wrong
versions. Mutation-style: the test suite's own tools are run with the bug in place."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import test_properties
import test_tokenizer
from minipaligemma import PaliGemma, museum
from minipaligemma.compare import compare_layers, paligemma_hf_layer_pairs
from minipaligemma.museum import BUGS, TINY
from minipaligemma.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def with_vocab(vocab_size):
    return replace(TINY, text=replace(TINY.text, vocab_size=vocab_size))


def bug_model_inputs(name, **input_options):
    bug = BUGS[name]
    return bug, museum.random_model(bug.config), museum.random_inputs(bug.config, **input_options)


@pytest.fixture(scope="module")
def captioner():
    return museum.train_caption_model()


def test_every_bug_is_documented_and_applied_only_inside_its_block():
    page = (ROOT / "docs" / "bug-museum.md").read_text()
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", page, flags=re.M)
    assert documented == list(BUGS) and len(BUGS) >= 8
    model, inputs = museum.random_model(), museum.random_inputs()
    with torch.no_grad():
        before = model(**inputs)
        for bug in BUGS.values():
            with bug.applied(model):
                pass
        assert torch.equal(model(**inputs), before)  # every bug undone on leaving its block


# --- Tool: compare_layers. Where the first divergence is, and the sub-layer inside it.

LAYER_BUGS = {  # bug -> (first divergent layer, sub-layers of llm.layers.0 that agree, the first that does not)
    "rmsnorm-w": ([], "pre_attention_norm"),
    "rope-interleaved": (["pre_attention_norm"], "attn"),
    "head-dim-scale": (["pre_attention_norm"], "attn"),
    "gemma1-block": (["pre_attention_norm"], "attn"),
    "causal-prefix": (["pre_attention_norm"], "attn"),
    # RMSNorm is blind to scale: the norm, attention and its post-norm agree, the residual does not;
    # made 8x smaller, the image tokens are near the norm's eps, which shows in the first norm.
    "image-times-sqrt-width": (["pre_attention_norm", "attn", "post_attention_norm"], "pre_ffw_norm"),
    "image-over-sqrt-width": ([], "pre_attention_norm"),
}


@pytest.mark.parametrize("name", LAYER_BUGS)
def test_compare_layers_finds_the_first_divergence_at_the_bug(name):
    bug, model, inputs = bug_model_inputs(name)
    report = museum.layer_report(model, bug, inputs)
    assert report.first_divergence.ours == "llm.layers.0", report
    assert all(row.max_abs == 0 for row in report.rows[:report.rows.index(report.first_divergence)])
    agree, first = LAYER_BUGS[name]
    inside = museum.layer_report(model, bug, inputs, [f"llm.layers.0.{part}" for part in agree + [first]])
    assert inside.first_divergence.ours == f"llm.layers.0.{first}", inside


def test_the_gemma1_block_is_refused_by_strict_loading():
    pali2 = museum.random_model()
    with BUGS["gemma1-block"].applied(pali2):
        gemma1 = PaliGemma(pali2.config)  # the config the bug builds
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*post_attention_norm"):
        gemma1.load_state_dict(pali2.state_dict())


@pytest.mark.parametrize("name", ["rmsnorm-w", "rope-interleaved", "head-dim-scale", "gemma1-block",
                                  "image-times-sqrt-width", "causal-prefix", "sliding-window"])
def test_compare_layers_against_transformers_passes_then_catches_the_bug(name):
    hf_reference = pytest.importorskip("hf_reference")
    bug = BUGS[name]
    cfg = bug.config
    hf = hf_reference.hf_paligemma(cfg)
    ours = hf_reference.ours_from_hf(cfg, hf)
    inputs = museum.random_inputs(cfg)
    hf_inputs = hf_reference.hf_inputs(cfg, inputs["input_ids"], inputs["mask_ar"], inputs["mask_input"])
    pairs = paligemma_hf_layer_pairs(cfg)

    def run_ours(model):
        return model(**inputs)

    def run_buggy(model):
        with bug.applied(model):
            return model(**inputs)

    def run_hf(model):
        return model(pixel_values=inputs["pixel_values"], **hf_inputs)

    assert compare_layers(ours, hf, pairs, run_ours, run_hf).first_divergence is None
    assert compare_layers(ours, hf, pairs, run_buggy, run_hf).first_divergence.ours == "llm.layers.0"


def test_the_sliding_window_shows_only_on_inputs_longer_than_the_window():
    bug = BUGS["sliding-window"]
    model = museum.random_model(bug.config)
    short = museum.random_inputs(bug.config, text_len=museum.SLIDING_WINDOW - TINY.num_image_tokens)
    long = museum.random_inputs(bug.config, text_len=museum.SLIDING_WINDOW - TINY.num_image_tokens + 4)
    assert museum.logit_error(model, bug, short) == 0
    assert museum.layer_report(model, bug, short).first_divergence is None
    assert museum.layer_report(model, bug, long).first_divergence.ours == "llm.layers.0"
    assert museum.logit_error(model, bug, long) > 0.1


def test_the_final_softcap_hides_from_layers_and_greedy_decoding_but_not_from_logits():
    bug, model, inputs = bug_model_inputs("final-softcap-in-transfer")
    assert museum.layer_report(model, bug, inputs).first_divergence is None  # every layer agrees
    assert museum.logit_error(model, bug, inputs) > 0.01
    with torch.no_grad():
        correct = model(**inputs)
        with bug.applied(model):
            capped = model(**inputs)
    assert torch.equal(correct.argmax(-1), capped.argmax(-1))  # the cap is monotonic: greedy cannot tell
    assert (correct.log_softmax(-1) - capped.log_softmax(-1)).abs().max() > 0.01


# --- Tool: property checks, the museum's and the test suite's own (tests/test_properties.py).

@pytest.mark.parametrize("name, holds, suite_test", [
    ("causal-prefix", museum.prefix_is_bidirectional, test_properties.test_prefix_tokens_see_each_other_both_ways),
    ("pads-attended", museum.padding_is_invisible, test_properties.test_padding_changes_no_valid_output),
])
def test_the_property_passes_on_the_correct_model_and_fails_with_the_bug(name, holds, suite_test):
    bug, model, _ = bug_model_inputs(name)
    assert holds(model)
    suite_test()
    with bug.applied(model):
        assert not holds(model)
        with pytest.raises(AssertionError):
            suite_test()  # the suite's hypothesis test finds a counterexample with the bug in place


def test_pads_attended_changes_a_padded_batch():
    bug, model, inputs = bug_model_inputs("pads-attended", pads=3)
    assert museum.logit_error(model, bug, museum.random_inputs()) == 0  # no padding, no symptom
    assert museum.logit_error(model, bug, inputs) > 0.1


def test_interleaved_rope_keeps_the_relative_position_property():
    # Why compare_layers is needed for it: interleaved RoPE is relative too, so the property passes.
    with BUGS["rope-interleaved"].applied(None):
        test_properties.test_rope_scores_depend_only_on_position_difference()


def test_pipeline_bugs_are_caught_by_their_properties(captioner):
    tok = captioner.tokenizer
    model = museum.random_model(with_vocab(tok.vocab_size))
    assert museum.layout_is_big_visions(tok)
    assert museum.suffix_is_causal(model, museum.training_batch(tok))
    assert museum.loss_ignores_prompt(museum.training_batch(tok))
    for name in ("token-types-missing", "labels-everywhere", "no-bos"):
        with BUGS[name].applied(model):
            assert not museum.layout_is_big_visions(tok), name
    with BUGS["token-types-missing"].applied(model):
        assert not museum.suffix_is_causal(model, museum.training_batch(tok))
    with BUGS["labels-everywhere"].applied(model):
        assert not museum.loss_ignores_prompt(museum.training_batch(tok))


def test_a_tokenizer_without_the_loc_pieces_is_caught(tmp_path):
    tok = train_tokenizer(test_tokenizer.corpus(), test_tokenizer.BASE, tmp_path / "tokenizer.model")
    sp_file = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert museum.loc_tokens_are_whole(tok)
    test_tokenizer.test_loc_and_seg_ids(tok, sp_file)
    with BUGS["loc-split"].applied(None):
        assert not museum.loc_tokens_are_whole(tok)
        assert len(tok.encode("<loc0012>")) > 4  # sub-word pieces: "<", "loc", digits, ">"
        with pytest.raises(AssertionError):
            test_tokenizer.test_loc_and_seg_ids(tok, sp_file)
    assert tok.encode("<loc0012>") == [tok.loc_id(12)]


# --- Tool: a generation check on a model that has learnt to caption.

def test_the_caption_model_reads_the_image(captioner):
    assert museum.captions(captioner.model, captioner.tokenizer, captioner.images) == captioner.targets
    real = museum.caption_loss(captioner.model, captioner.tokenizer, captioner.images, captioner.targets)
    blank = museum.caption_loss(captioner.model, captioner.tokenizer, [museum.blank_image()] * len(captioner.images),
                                captioner.targets)
    assert real < 0.1 and blank > 1.0


def test_rmsnorm_w_empties_the_captions(captioner):
    with BUGS["rmsnorm-w"].applied(captioner.model):
        answers = museum.captions(captioner.model, captioner.tokenizer, captioner.images)
    assert all(answer.strip() == "" for answer in answers)  # only "\n" pieces


def test_token_types_missing_lowers_the_loss_while_the_captions_stay_wrong(captioner):
    with BUGS["token-types-missing"].applied(None):
        leaky = museum.train_caption_model()
    assert leaky.losses[-1] < 0.05  # label leakage: each answer token saw the next
    causal_loss = museum.caption_loss(leaky.model, leaky.tokenizer, leaky.images, leaky.targets)
    assert causal_loss > 0.5  # the same model and data, the answers causal as in generation
    assert museum.captions(leaky.model, leaky.tokenizer, leaky.images) != leaky.targets


# --- The exercise checks of notebook 6: each accepts the reference, rejects wrong versions.

def first_divergence(ours, ref, tol):
    for name in ours:
        if ((ours[name] - ref[name]).norm() / ref[name].norm()).item() > tol:
            return name
    return None


def first_divergence_by_max_abs(ours, ref, tol):
    return next((name for name in ours if (ours[name] - ref[name]).abs().max() > tol), None)


def first_divergence_worst(ours, ref, tol):
    errors = {name: ((ours[name] - ref[name]).norm() / ref[name].norm()).item() for name in ours}
    worst = max(errors, key=errors.get)
    return worst if errors[worst] > tol else None


def first_divergence_never_none(ours, ref, tol):
    return next((name for name in ours if ((ours[name] - ref[name]).norm() / ref[name].norm()) > tol), list(ours)[-1])


@pytest.mark.parametrize("fn, expected", [
    (first_divergence, "passes"),
    (first_divergence_by_max_abs, "not absolute differences"),
    (first_divergence_worst, "is the first over the tolerance"),
    (first_divergence_never_none, "expected None"),
])
def test_check_first_divergence(fn, expected, capsys):
    line = museum.check_first_divergence(fn)
    assert expected in line and capsys.readouterr().out == line + "\n"


def padding_marked_real(model):  # the pads are given as real tokens (mask_input 1)
    pixels = torch.zeros(1, 3, 32, 32)
    ids = torch.arange(4, 10)[None]
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask_ar = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        return torch.allclose(model(pixels, ids, mask_ar[:, :6]), model(pixels, padded, mask_ar)[:, :6], atol=1e-5)


def padding_in_the_prompt_block(model):  # the pads get mask_ar 0 and mask_input 1: they join the prompt
    pixels = torch.zeros(1, 3, 32, 32)
    ids = torch.arange(4, 10)[None]
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(pixels, ids, torch.zeros(1, 6, dtype=torch.long))
        return torch.allclose(alone, model(pixels, padded, torch.zeros(1, 9, dtype=torch.long))[:, :6], atol=1e-5)


def padding_compared_everywhere(model):  # the pad positions' logits compared too
    pixels = torch.zeros(1, 3, 32, 32)
    ids = torch.arange(4, 10)[None]
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask_ar = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)], 1)
    mask_input = 1 - mask_ar
    with torch.no_grad():
        return torch.allclose(model(pixels, ids, mask_ar[:, :6]), model(pixels, padded, mask_ar, mask_input), atol=1e-5)


@pytest.mark.parametrize("fn, expected", [
    (museum.padding_is_invisible, "passes"),
    (padding_marked_real, "does not catch pads-attended"),
    (padding_in_the_prompt_block, "returns False for the correct model"),
    (padding_compared_everywhere, "it raised RuntimeError"),
])
def test_check_padding_property(fn, expected):
    assert expected in museum.check_padding_property(fn)


def loss_unchanged_by(batch, positions, change):
    ids = batch["input_ids"]
    logits = torch.randn(1, ids.shape[1], int(ids.max()) + 1, generator=torch.Generator().manual_seed(0))
    changed = logits.clone()
    changed[:, positions] = change(changed[:, positions])
    return torch.equal(museum.prefix_lm_loss(logits, ids, batch["mask_loss"]),
                       museum.prefix_lm_loss(changed, ids, batch["mask_loss"]))


def loss_with_the_separator_changed(batch):  # the "\n" position's logits changed too
    prompt = int((batch["mask_ar"][0] == 0).sum())
    return loss_unchanged_by(batch, slice(0, prompt), lambda x: x + torch.randn_like(x))


def loss_with_a_constant_shift(batch):  # one constant per position: the softmax cannot see it
    prompt = int((batch["mask_ar"][0] == 0).sum())
    return loss_unchanged_by(batch, slice(0, prompt - 1), lambda x: x + 3.0)


@pytest.mark.parametrize("fn, expected", [
    (museum.loss_ignores_prompt, "passes"),
    (loss_with_the_separator_changed, "returns False for a correct batch"),
    (loss_with_a_constant_shift, "does not catch labels-everywhere"),
])
def test_check_loss_property(fn, expected, captioner):
    assert expected in museum.check_loss_property(fn, captioner.tokenizer)
