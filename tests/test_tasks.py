"""Task outputs: parsing (hand-derived boxes, invalid objects, never raising), targets, drawing,
and metrics on hand-made cases."""

import math

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from minipaligemma.tasks import (
    DetectionCounts,
    TaskObject,
    box_iou,
    box_to_loc_string,
    cider_d,
    clean_text,
    count_detections,
    draw,
    exact_match,
    label_colour,
    mask_iou,
    mask_to_target,
    mean_iou,
    parse_detections,
    parse_segmentations,
    relaxed_match,
)
from minipaligemma.vqvae import TINY_CONFIG, MaskVQVAE

SEGS = "".join(f"<seg{i:03d}>" for i in range(16))


@pytest.fixture(scope="module")
def vqvae():
    torch.manual_seed(0)
    return MaskVQVAE(TINY_CONFIG).eval()


class _FixedDecoder:
    """Stands in for the VQ-VAE: every code sequence decodes to the same 64x64 logits."""

    def __init__(self, logits: np.ndarray):
        self.logits = torch.as_tensor(logits, dtype=torch.float32)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(codes), 64, 64)


class _RecordingEncoder:
    """Stands in for the VQ-VAE: remembers the 64x64 input and returns codes 0..15."""

    def encode_masks(self, masks: torch.Tensor) -> torch.Tensor:
        self.masks = masks
        return torch.arange(16)[None].expand(len(masks), 16)


# ----------------------------------------------------------------------------- detection


def test_detections_hand_derived_boxes_divisor_1024():
    text = "<loc0256><loc0512><loc0768><loc1000> cat ; <loc0000><loc0100><loc0512><loc0300> traffic light<eos>"
    cat, light = parse_detections(text, image_size=(480, 640))
    assert (cat.label, light.label) == ("cat", "traffic light")
    assert cat.valid and light.valid
    # y scales with H = 480, x with W = 640: 256/1024*480 = 120, 512/1024*640 = 320, ...
    assert cat.box == pytest.approx((120.0, 320.0, 360.0, 625.0))
    assert light.box == pytest.approx((0.0, 62.5, 240.0, 187.5))


def test_detections_hand_derived_boxes_divisor_1023():
    (obj,) = parse_detections("<loc0000><loc0341><loc1023><loc0682> dog", image_size=(300, 600), divisor=1023)
    # 341/1023 = 1/3 and 682/1023 = 2/3 exactly; 1023/1023 = 1.
    assert obj.box == pytest.approx((0.0, 200.0, 300.0, 400.0))


def test_detection_accepts_seg_tokens_and_missing_labels():
    box = "<loc0010><loc0020><loc0030><loc0040>"
    a, b = parse_detections(box + SEGS + " ; " + box, (1024, 1024))
    assert a.valid and b.valid and a.label == b.label == ""
    assert a.box == b.box == (10.0, 20.0, 30.0, 40.0)


def test_no_objects_in_an_empty_answer():
    assert parse_detections("", (10, 10)) == []
    assert parse_detections("  ;  ; <eos>", (10, 10)) == []


BOX = "<loc0100><loc0200><loc0300><loc0400>"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("cat", "exactly 4 <loc>"),
        ("<loc0100><loc0200><loc0300> cat", "exactly 4 <loc>"),
        (BOX + "<loc0500> cat", "exactly 4 <loc>"),
        ("cat " + BOX, "exactly 4 <loc>"),
        ("<seg001>" + BOX + " cat", "exactly 4 <loc>"),
        (BOX + "<seg001><seg002> cat", "expected 0 or 16 <seg>"),
        (BOX + " cat <loc0001>", "after the label"),
        ("<loc1024><loc0200><loc0300><loc0400> cat", "out of range"),
        (BOX + SEGS.replace("<seg015>", "<seg128>"), "out of range"),
        ("<loc0300><loc0200><loc0100><loc0400> cat", "empty box"),
        ("<loc0100><loc0400><loc0300><loc0400> cat", "empty box"),
        ("<loc01><loc0200><loc0300><loc0400> cat", "exactly 4 <loc>"),
    ],
)
def test_invalid_objects_are_reported_not_raised(text, reason):
    (obj,) = parse_detections(text, (100, 100))
    assert not obj.valid and reason in obj.error
    assert obj.box is None and obj.mask is None


def test_valid_and_invalid_objects_side_by_side():
    objects = parse_detections(BOX + " a ; junk ; " + BOX + " b", (100, 100))
    assert [o.valid for o in objects] == [True, False, True]
    assert [o.label for o in objects] == ["a", "junk", "b"]


def test_unknown_divisor_is_an_error():
    with pytest.raises(ValueError, match="1024"):
        parse_detections(BOX, (10, 10), divisor=1000)


def test_clean_text():
    assert clean_text("  the answer<eos><pad><pad>") == "the answer"
    assert clean_text("<bos>hi<eos>anything after eos") == "hi"
    assert clean_text(BOX + " cat") == BOX + " cat"  # loc/seg tokens are content, not special


# ----------------------------------------------------------------------------- never raising

_pieces = st.one_of(
    st.integers(0, 9999).map(lambda i: f"<loc{i:04d}>"),
    st.integers(0, 999).map(lambda i: f"<seg{i:03d}>"),
    st.sampled_from([";", " ; ", " ", "cat", "traffic light", "<eos>", "<pad>", "<", ">", "<loc", "\n", "é"]),
    st.text(max_size=5),
)
_objects = st.builds(  # well-formed or nearly: exercises the valid path with random ids
    lambda locs, segs, label: "".join(f"<loc{i:04d}>" for i in locs) + "".join(f"<seg{i:03d}>" for i in segs) + label,
    st.one_of(
        st.lists(st.integers(0, 1030), min_size=3, max_size=5),
        st.tuples(st.integers(0, 511), st.integers(0, 511), st.integers(512, 1023), st.integers(512, 1023)),
    ),
    st.one_of(
        st.just([]),
        st.lists(st.integers(0, 127), min_size=16, max_size=16),
        st.lists(st.integers(0, 130), min_size=15, max_size=17),
    ),
    st.sampled_from(["", " cat", " traffic light", "<eos>"]),
)
_texts = st.one_of(
    st.text(), st.lists(_pieces, max_size=60).map("".join), st.lists(_objects, min_size=1, max_size=4).map(" ; ".join)
)
_sizes = st.tuples(st.integers(1, 200), st.integers(1, 200))


def _check_objects(objects, image_size, with_masks):
    height, width = image_size
    event(f"valid objects: {sum(obj.valid for obj in objects) > 0}")
    for obj in objects:
        if obj.valid:
            y_min, x_min, y_max, x_max = obj.box
            assert 0 <= y_min < y_max <= height and 0 <= x_min < x_max <= width
            assert (obj.mask is not None) == with_masks
            if with_masks:
                assert obj.mask.shape == image_size and obj.mask.dtype == bool
        else:
            assert obj.error and obj.box is None and obj.mask is None


@settings(max_examples=300, deadline=None)
@given(text=_texts, image_size=_sizes, divisor=st.sampled_from([1024, 1023]))
def test_parse_detections_never_raises(text, image_size, divisor):
    _check_objects(parse_detections(text, image_size, divisor), image_size, with_masks=False)


@settings(max_examples=150, deadline=None)
@given(text=_texts, image_size=_sizes, divisor=st.sampled_from([1024, 1023]))
def test_parse_segmentations_never_raises(vqvae, text, image_size, divisor):
    _check_objects(parse_segmentations(text, image_size, vqvae, divisor), image_size, with_masks=True)


@settings(max_examples=200, deadline=None)
@given(prediction=_texts, target=_texts)
def test_text_metrics_never_raise(prediction, target):
    assert isinstance(clean_text(prediction), str)
    assert exact_match(prediction, prediction)
    assert relaxed_match(prediction, prediction)
    relaxed_match(prediction, target)


# ----------------------------------------------------------------------------- segmentation


def test_segmentation_mask_is_resized_thresholded_and_pasted():
    logits = np.where(np.arange(64) < 32, 1.0, -1.0) * np.ones((64, 1))  # left half inside
    text = "<loc0100><loc0200><loc0300><loc0600>" + SEGS + " cat"
    (obj,) = parse_segmentations(text, (1024, 1024), _FixedDecoder(logits), divisor=1024)
    assert obj.valid and obj.label == "cat" and obj.box == (100.0, 200.0, 300.0, 600.0)
    # The 400-px-wide box: bilinear up-sampling crosses zero exactly halfway, after 200 columns.
    expected = np.zeros((1024, 1024), dtype=bool)
    expected[100:300, 200:400] = True
    assert np.array_equal(obj.mask, expected)


@pytest.mark.parametrize("divisor, edge", [(1024, 98), (1023, 97)])
def test_pixel_edges_round_for_1024_and_truncate_for_1023(divisor, edge):
    # loc 100 on a 1000-px image: 97.66 px (/1024, rounded to 98) or 97.75 px (/1023, cut to 97).
    text = "<loc0100><loc0100><loc0500><loc0500>" + SEGS
    (obj,) = parse_segmentations(text, (1000, 1000), _FixedDecoder(np.ones((64, 64))), divisor=divisor)
    rows, cols = np.nonzero(obj.mask)
    assert rows.min() == cols.min() == edge


def test_segmentation_needs_16_seg_tokens(vqvae):
    (obj,) = parse_segmentations(BOX + " cat", (100, 100), vqvae)
    assert not obj.valid and "16 <seg>" in obj.error


def test_several_segmentations_decode_in_one_go(vqvae):
    text = BOX + SEGS + " a ; broken ; " + "<loc0000><loc0000><loc0512><loc0512>" + SEGS + " b"
    objects = parse_segmentations(text, (64, 48), vqvae)
    assert [o.valid for o in objects] == [True, False, True]
    assert objects[2].mask[32:].sum() == 0 and objects[2].mask[:, 24:].sum() == 0  # outside its box


# ----------------------------------------------------------------------------- training targets


def test_box_to_loc_string_hand_derived():
    assert box_to_loc_string((120, 320, 360, 625), (480, 640)) == "<loc0256><loc0512><loc0768><loc1000>"
    assert box_to_loc_string((0, 0, 480, 640), (480, 640), divisor=1023) == "<loc0000><loc0000><loc1023><loc1023>"
    # The far edge at /1024 (bin 1024) and boxes outside the image are clipped.
    assert box_to_loc_string((-5, 0, 480, 700), (480, 640)) == "<loc0000><loc0000><loc1023><loc1023>"


@settings(max_examples=300, deadline=None)
@given(
    image_size=st.tuples(st.integers(1, 4000), st.integers(1, 4000)),
    fractions=st.lists(st.floats(0, 1), min_size=4, max_size=4),
    divisor=st.sampled_from([1024, 1023]),
)
def test_box_round_trip_error_is_at_most_half_a_bin(image_size, fractions, divisor):
    height, width = image_size
    y0, y1 = sorted(fractions[:2])
    x0, x1 = sorted(fractions[2:])
    box = (y0 * height, x0 * width, y1 * height, x1 * width)
    text = box_to_loc_string(box, image_size, divisor)
    locs = [int(text[i + 4 : i + 8]) for i in range(0, 36, 9)]
    decoded = [loc / divisor * size for loc, size in zip(locs, (height, width, height, width))]
    for value, original, size in zip(decoded, box, (height, width, height, width)):
        # Half a bin, except that bin 1024 does not exist: near the far edge /1024 clips to 1023.
        clipped = original / size * divisor > 1023.5
        bound = size / divisor if clipped else size / (2 * divisor)
        assert abs(value - original) <= bound * (1 + 1e-9)


def test_mask_to_target_crops_resizes_and_encodes():
    mask = np.zeros((100, 200), dtype=bool)
    mask[20:60, 50:150] = True
    mask[20:40, 50:100] = False  # a notch in the top-left quarter of the box
    encoder = _RecordingEncoder()
    target = mask_to_target(mask, (20, 50, 60, 150), encoder)
    assert target == box_to_loc_string((20, 50, 60, 150), (100, 200), divisor=1023) + SEGS
    seen = encoder.masks[0]  # [64, 64]: the box crop, stretched to 64x64
    assert seen.shape == (64, 64)
    assert torch.all((seen >= 0) & (seen <= 1))
    # Away from the notch's edges (which bilinear filtering blurs) the crop is 0 or 1.
    inside = torch.ones_like(seen, dtype=torch.bool)
    inside[:32, :32] = False
    far = torch.ones_like(inside)
    far[28:36, :36] = far[:36, 28:36] = False
    assert torch.allclose(seen[far], inside[far].float(), atol=1e-6)


def test_mask_to_target_round_trips_through_the_parser(vqvae):
    mask = np.zeros((90, 120), dtype=bool)
    mask[10:70, 30:100] = True
    target = mask_to_target(mask, (10, 30, 70, 100), vqvae)
    assert target.count("<loc") == 4 and target.count("<seg") == 16
    (obj,) = parse_segmentations(target, (90, 120), vqvae)
    assert obj.valid and obj.box == pytest.approx((10, 30, 70, 100), abs=120 / 2046)  # half a bin
    expected_codes = vqvae.encode_masks(torch.ones(1, 64, 64))[0].tolist()
    assert target.endswith("".join(f"<seg{c:03d}>" for c in expected_codes))


def test_mask_to_target_rejects_an_empty_box(vqvae):
    with pytest.raises(ValueError, match="no pixel"):
        mask_to_target(np.ones((10, 10)), (5, 5, 5, 8), vqvae)


# ----------------------------------------------------------------------------- drawing


def test_draw_marks_the_box_and_mask_and_keeps_the_size():
    image = Image.new("RGB", (64, 48), (128, 128, 128))
    mask = np.zeros((48, 64), dtype=bool)
    mask[10:30, 10:40] = True
    drawn = draw(image, [TaskObject("cat", (10, 10, 30, 40), mask)])
    assert drawn.size == image.size and drawn.mode == "RGB"
    before, after = np.asarray(image), np.asarray(drawn)
    assert (after[10:30, 10:40] != before[10:30, 10:40]).any(axis=-1).mean() > 0.9  # tinted inside
    assert np.array_equal(after[35:, 45:], before[35:, 45:])  # untouched away from the object
    assert np.asarray(image).mean() == 128  # the input is not modified


def test_draw_skips_invalid_objects_and_colours_by_label():
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    assert np.array_equal(np.asarray(draw(image, [TaskObject("x", error="bad")])), np.asarray(image))
    assert label_colour("cat") == label_colour("cat")
    assert len({label_colour(name) for name in ["cat", "dog", "car", "tree", "person"]}) > 1


# ----------------------------------------------------------------------------- metrics


def test_box_iou_hand_made():
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_detection_precision_recall_hand_made():
    truth = [
        TaskObject("cat", (0, 0, 10, 10)),
        TaskObject("cat", (20, 20, 30, 30)),
        TaskObject("dog", (0, 20, 10, 30)),
    ]
    predicted = [
        TaskObject("cat", (0, 0, 10, 8)),  # IoU 0.8 with the first cat: hit
        TaskObject("cat", (0, 0, 10, 10)),  # that cat is taken, the other too far: miss
        TaskObject("cat", (0, 20, 10, 30)),  # on the dog, wrong label: miss
        TaskObject("Dog.", (0, 20, 10, 25)),  # IoU exactly 0.5, label normalised: hit
        TaskObject("dog", error="empty box"),  # invalid: a false positive
    ]
    counts = count_detections(predicted, truth)
    assert counts == DetectionCounts(true_positives=2, predicted=5, ground_truth=3)
    assert counts.precision == pytest.approx(2 / 5) and counts.recall == pytest.approx(2 / 3)
    total = counts + count_detections([], [TaskObject("cat", (0, 0, 1, 1))])
    assert (total.true_positives, total.predicted, total.ground_truth) == (2, 5, 4)
    # At IoU 0.9 the first cat is too loose, so the exact duplicate claims it instead.
    assert count_detections(predicted, truth, iou_threshold=0.9).true_positives == 1
    assert DetectionCounts().precision == DetectionCounts().recall == 1.0


def test_mask_iou_and_mean_iou_hand_made():
    a = np.zeros((4, 4), dtype=bool)
    a[:2] = True  # 8 pixels
    b = np.zeros((4, 4), dtype=bool)
    b[1:3] = True  # 8 pixels, 4 shared, union 12
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(None, a) == 0.0  # invalid prediction
    assert mask_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert mean_iou([a, None, b], [a, a, a]) == pytest.approx((1 + 0 + 1 / 3) / 3)
    with pytest.raises(ValueError):
        mask_iou(a, np.zeros((3, 4)))


def test_exact_and_relaxed_match():
    assert exact_match("Yes.<eos>", "yes") and exact_match("  New   York ", "new york")
    assert not exact_match("no", "yes")
    assert relaxed_match("10.4", "10") and not relaxed_match("10.6", "10")  # 4% vs 6%
    assert relaxed_match("45%", "45") and relaxed_match("1,000", "1000.0")
    assert relaxed_match("0", "0") and not relaxed_match("0.01", "0")
    assert relaxed_match("Blue", "blue") and not relaxed_match("blue", "red")
    assert not relaxed_match("nan", "10") and relaxed_match("10", "10", tolerance=0)


def test_cider_d_hand_computed():
    # Two images: "a" is in both reference sets (idf 0), "cat"/"dog" and the bigrams in one
    # (idf log 2). Each candidate matches its references exactly for n = 1, 2 (cosine 1) and has
    # no 3- or 4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    assert cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx(5.0)
    # Swapped: only the idf-0 word "a" is shared, so nothing scores.
    assert cider_d(["a dog", "a cat"], [["a cat"], ["a dog"]]) == pytest.approx(0.0)


def test_cider_d_properties():
    references = [
        ["a cat sits on a red mat", "a cat on a mat"],
        ["two dogs run in the park", "dogs running on grass"],
        ["a plate of food on a table", "food served on a white plate"],
    ]
    first_references = [refs[0] for refs in references]
    exact = cider_d(first_references, references)
    partial = cider_d(["a cat on the floor", "two dogs in a park", "a plate with food"], references)
    empty = cider_d(["", "", ""], references)
    assert exact > partial > empty == 0.0
    assert math.isfinite(exact)
    shouted = ["A cat, sits on a red mat!"] + first_references[1:]  # case and punctuation are ignored
    assert cider_d(shouted, references) == pytest.approx(exact)
    with pytest.raises(ValueError):
        cider_d(["one"], [["a"], ["b"]])
