"""Strict loading of transformers-layout state dicts, in each of the three key spellings."""

import re

import pytest
import torch
from safetensors.torch import load_file

from hf_reference import hf_paligemma
from minipaligemma import PaliGemma, get_config
from minipaligemma.compare import compare_layers, paligemma_hf_layer_pairs
from minipaligemma.layouts import CheckpointError, canonical_hf_key, load_hf_state_dict

CFG = get_config("tiny")


@pytest.fixture(scope="module")
def hf_model():
    return hf_paligemma(CFG, seed=11)


def hub_4x_spelling(state_dict):
    """The names of the published hub files: vision_tower.vision_model.*, language_model.model.*,
    language_model.lm_head.weight (written by transformers 4.x conversion scripts)."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^model\.vision_tower\.", "vision_tower.vision_model.", key)
        key = re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", key)
        key = re.sub(r"^model\.language_model\.", "language_model.model.", key)
        key = re.sub(r"^lm_head\.", "language_model.lm_head.", key)
        out[key] = value
    return out


def loaded(state_dict):
    model = PaliGemma(CFG).eval()
    load_hf_state_dict(model, state_dict)
    return model


def test_all_three_spellings_load_to_the_same_model(hf_model, tmp_path):
    in_memory = hf_model.state_dict()
    hf_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("language_model.model.") for k in saved)  # really the other spelling
    hub = hub_4x_spelling(in_memory)
    reference = loaded(in_memory).state_dict()
    for spelling in (saved, hub):
        for key, value in loaded(spelling).state_dict().items():
            assert torch.equal(value, reference[key]), key


def test_canonical_key_of_each_spelling():
    expected = "vision_tower.encoder.layers.0.mlp.fc1.weight"
    for key in ("model.vision_tower.encoder.layers.0.mlp.fc1.weight", expected,
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"):
        assert canonical_hf_key(key) == expected
    for key in ("model.language_model.norm.weight", "language_model.model.norm.weight"):
        assert canonical_hf_key(key) == "language_model.norm.weight"


def test_missing_key_is_named(hf_model):
    sd = dict(hf_model.state_dict())
    del sd["model.language_model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \['language_model.layers.1.mlp.up_proj.weight'\]"):
        loaded(sd)


def test_unexpected_key_is_named(hf_model):
    sd = dict(hf_model.state_dict())
    sd["model.language_model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['language_model.layers.9.mlp.up_proj.weight'\]"):
        loaded(sd)


def test_shape_mismatch_names_key_and_both_shapes(hf_model):
    sd = dict(hf_model.state_dict())
    sd["model.multi_modal_projector.linear.weight"] = torch.zeros(64, 65)
    with pytest.raises(CheckpointError, match=r"multi_modal_projector.linear.weight has shape \[64, 65\], "
                                              r"the model expects \[64, 64\]"):
        loaded(sd)


def test_untied_lm_head_is_refused(hf_model):
    sd = dict(hf_model.state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="lm_head.weight is not a copy"):
        loaded(sd)


def test_layer_report_points_at_a_planted_bug(hf_model):
    """The comparison tool finds the first layer that diverges: plant w instead of 1 + w."""
    ours = loaded(hf_model.state_dict())
    with torch.no_grad():
        ours.llm.layers[1].pre_ffw_norm.weight.add_(1.0)  # as if a norm forgot its "1 +"
    ids = torch.randint(3, CFG.text.vocab_size, (1, 6))
    mask_ar = torch.tensor([[0, 0, 0, 1, 1, 1]])
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    hf_ids = torch.cat([torch.full((1, CFG.num_image_tokens), CFG.text.vocab_size), ids], 1)
    report = compare_layers(ours, hf_model, paligemma_hf_layer_pairs(CFG),
                            run_ours=lambda m: m(pixels, ids, mask_ar),
                            run_ref=lambda m: m(pixel_values=pixels, input_ids=hf_ids,
                                                token_type_ids=torch.cat([0 * hf_ids[:, :-3], mask_ar[:, 3:]], 1)))
    assert report.first_divergence is not None and report.first_divergence.ours == "llm.layers.1"
    assert all(row.rel <= 1e-5 for row in report.rows[: report.rows.index(report.first_divergence)])
    assert "<-- first divergence" in str(report)
