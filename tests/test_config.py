"""Presets: every official variant has exactly the published parameter count."""

import pytest
import torch

from minipaligemma import PaliGemma, get_config
from minipaligemma.config import PRESETS, TextConfig, VisionConfig

# docs/architecture.md §6.2, derived from the official checkpoint shapes; the PaliGemma 2 3B
# numbers equal keras-hub's preset metadata. Vocabulary 257152 (big_vision's).
EXPECTED = {
    "paligemma-3b-224": 2_923_335_408, "paligemma-3b-448": 2_924_220_144, "paligemma-3b-896": 2_927_759_088,
    "paligemma2-3b-224": 3_032_094_960, "paligemma2-3b-448": 3_032_979_696, "paligemma2-3b-896": 3_036_518_640,
    "paligemma2-10b-224": 9_662_409_456, "paligemma2-10b-448": 9_663_294_192, "paligemma2-10b-896": 9_666_833_136,
    "paligemma2-28b-224": 27_650_192_112, "paligemma2-28b-448": 27_651_076_848,
    "paligemma2-28b-896": 27_654_615_792,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_official_preset_parameter_count(name):
    with torch.device("meta"):
        model = PaliGemma(get_config(name))
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[name]


def test_vision_tower_alone_matches_published_count():
    with torch.device("meta"):
        model = PaliGemma(get_config("paligemma2-3b-224"))
    assert sum(p.numel() for p in model.vision.parameters()) == 412_442_352  # docs/architecture.md §6.2


def test_every_official_preset_is_listed():
    official = [n for n in PRESETS if n.startswith("paligemma")]
    assert sorted(official) == sorted(EXPECTED)


def test_image_tokens_per_resolution():
    assert [get_config(f"paligemma2-3b-{r}").num_image_tokens for r in (224, 448, 896)] == [256, 1024, 4096]


def test_bad_configs_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionConfig(image_size=225)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TextConfig(num_heads=8, num_kv_heads=3)
    with pytest.raises(KeyError, match="unknown preset"):
        get_config("paligemma-7b")


def test_attention_implementation_is_a_named_choice():
    assert get_config("paligemma-3b-224").text.attn_implementation == "sdpa"  # the default
    assert TextConfig(attn_implementation="eager").attn_implementation == "eager"
    with pytest.raises(ValueError, match="attn_implementation must be one of 'eager', 'sdpa', 'flex', got 'flash'"):
        TextConfig(attn_implementation="flash")
