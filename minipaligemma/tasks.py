"""Task outputs: what PaliGemma writes, turned into objects, targets, pictures and scores.

PaliGemma answers `detect a ; b` with one object per box, `<locA><locB><locC><locD> label`,
objects separated by " ; ", and `segment x` with the 4 `<loc>` tokens followed by 16 `<seg>`
tokens (and the label in pretraining-style outputs) (docs/tasks.md §3, §4). This module parses such
text into `TaskObject`s, builds the same strings from boxes and masks for training, draws
objects on images, and scores predictions.

Design choices:
- Boxes are (y_min, x_min, y_max, x_max) in pixels of the original image everywhere, the order
  of the tokens. The image is squashed to a square for the model, so y scales with the height
  and x with the width.
- Two de-quantisation conventions exist and both are reproduced whole:
  divisor 1024 (the official HF demo): coordinate = loc / 1024 * size, pixel edge = round();
  divisor 1023 (big_vision RefCOCO): coordinate = loc / 1023 * size, pixel edge = int() (truncation).
  Detection defaults to 1024, segmentation to 1023 (the evaluator behind the RefCOCO numbers),
  (docs/tasks.md §2). Encoding is the inverse with the same divisor,
  loc = clip(round(coord / size * divisor), 0, 1023); with 1023 that is exactly big_vision's
  RefCOCO encoder, so a decode-encode round trip is off by at most half a bin (size / 2046), and
  with 1024 by at most half a bin except in the last half bin, where the clip costs up to one.
- Parsing never raises on any text. The text is cleaned (everything from `<eos>` on is dropped,
  as are `<pad>`/`<bos>`/`<unk>`), split at ";", and each non-empty piece becomes one object. A
  piece is valid when it is exactly 4 `<loc>` tokens, then 0 or 16 `<seg>` tokens (16 required
  for segmentation), then an optional label with no further tokens, with loc <= 1023, seg <= 127,
  y_max > y_min and x_max > x_min. Anything else is returned with `error` saying what is wrong,
  so callers can count invalid outputs (the RefCOCO metric scores them as IoU 0).
- Masks (docs/tasks.md §4.2-4.3): decode the 16 codes with the VQ-VAE to 64x64, resize to the pixel box with
  PIL bilinear, threshold > 0, paste into an all-False image; encoding crops the mask to the box,
  resizes to 64x64 (bilinear, antialiased, as TF's resize) and takes the 16 nearest codes.
- Metrics are small and dependency-free: box IoU; detection precision/recall at IoU 0.5 with
  greedy matching in output order (PaliGemma gives no scores) between same-label boxes; mask IoU
  and mean IoU as RefCOCO; exact and relaxed (ChartQA: numbers within 5%) answer match; CIDEr-D
  as in the COCO caption evaluation, with a simpler tokenizer (lower-case words, punctuation
  dropped) in place of the Java PTB tokenizer, so scores can differ slightly from pycocoevalcap.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .tokenizer import NUM_LOC_TOKENS, NUM_SEG_TOKENS
from .vqvae import MASK_SIZE, MaskVQVAE

SEG_TOKENS_PER_MASK = 16
# The pixel-edge rule that goes with each de-quantisation divisor (see the module docstring).
_PIXEL_EDGE = {1024: round, 1023: math.floor}

_TOKEN = re.compile(r"<loc([0-9]{4})>|<seg([0-9]{3})>")
_LEADING_TOKENS = re.compile(r"(?:\s*(?:<loc[0-9]{4}>|<seg[0-9]{3}>))*")
_SPECIAL = re.compile(r"<pad>|<bos>|<unk>")

Box = tuple[float, float, float, float]  # (y_min, x_min, y_max, x_max): pixels here, fractions in scenes.py


@dataclass
class TaskObject:
    """One detected or segmented object, or a ground-truth one (then `error` stays None)."""

    label: str = ""
    box: Box | None = None
    mask: np.ndarray | None = None  # [height, width] bool, full resolution
    error: str | None = None  # why the model's text for this object is invalid
    text: str = ""  # the piece of output it was parsed from

    @property
    def valid(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------- parsing


def clean_text(text: str) -> str:
    """Answer text without special tokens: cut at `<eos>`, drop `<pad>`/`<bos>`/`<unk>`, strip."""
    return _SPECIAL.sub("", text.split("<eos>", 1)[0]).strip()


def _check_divisor(divisor: int) -> None:
    if divisor not in _PIXEL_EDGE:
        raise ValueError(f"divisor must be 1024 (HF demo) or 1023 (big_vision RefCOCO), got {divisor}")


def _read_object(piece: str, seg_counts: tuple[int, ...]) -> tuple[list[int], list[int], str, str | None]:
    """Split one ';'-separated piece into loc ids, seg ids, label and what is wrong (or None)."""
    head = _LEADING_TOKENS.match(piece).group()
    tokens = _TOKEN.findall(head)  # [(loc digits or "", seg digits or "")]
    locs = [int(loc) for loc, _ in tokens if loc]
    segs = [int(seg) for _, seg in tokens if seg]
    label = piece[len(head) :].strip()
    kinds = "".join("L" if loc else "S" for loc, _ in tokens)
    if kinds != "L" * 4 + "S" * len(segs):
        error = "an object must start with exactly 4 <loc> tokens, then the <seg> tokens"
    elif len(segs) not in seg_counts:
        error = f"expected {' or '.join(map(str, seg_counts))} <seg> tokens, found {len(segs)}"
    elif _TOKEN.search(label):
        error = "<loc>/<seg> tokens after the label"
    elif max(locs) >= NUM_LOC_TOKENS or (segs and max(segs) >= NUM_SEG_TOKENS):
        error = f"token id out of range (loc < {NUM_LOC_TOKENS}, seg < {NUM_SEG_TOKENS})"
    elif locs[2] <= locs[0] or locs[3] <= locs[1]:
        error = "empty box: y_max <= y_min or x_max <= x_min"
    else:
        error = None
    return locs, segs, label, error


def _parse(text: str, image_size: tuple[int, int], divisor: int, seg_counts: tuple[int, ...]):
    """Objects (boxes in pixels) and the seg ids of each, for every ';'-separated piece."""
    _check_divisor(divisor)
    height, width = image_size
    objects, all_segs = [], []
    for piece in clean_text(text).split(";"):
        if not piece.strip():
            continue
        locs, segs, label, error = _read_object(piece, seg_counts)
        obj = TaskObject(label=label, error=error, text=piece.strip())
        if error is None:
            obj.box = tuple(loc / divisor * size for loc, size in zip(locs, (height, width, height, width)))
        objects.append(obj)
        all_segs.append(segs)
    return objects, all_segs


def parse_detections(text: str, image_size: tuple[int, int], divisor: int = 1024) -> list[TaskObject]:
    """Objects of a `detect` answer with label and box in pixels of a (height, width) image; never raises.

    Invalid pieces come back with `valid == False` and the reason in `error`. `divisor` picks the
    de-quantisation: 1024 as the official demo (default), 1023 as big_vision's RefCOCO pipeline.
    """
    return _parse(text, image_size, divisor, seg_counts=(0, SEG_TOKENS_PER_MASK))[0]


def _pixel_edges(box: Box, divisor: int) -> tuple[int, int, int, int]:
    return tuple(int(_PIXEL_EDGE[divisor](coordinate)) for coordinate in box)


def parse_segmentations(
    text: str, image_size: tuple[int, int], vqvae: MaskVQVAE, divisor: int = 1023
) -> list[TaskObject]:
    """Objects of a `segment` answer with box and full-resolution mask [height, width]; never raises.

    The 16 codes go through the VQ-VAE decoder (all objects in one batch) to 64x64 logits, which
    are resized to the pixel box (PIL bilinear), thresholded at 0 and pasted into an empty mask.
    """
    objects, all_segs = _parse(text, image_size, divisor, seg_counts=(SEG_TOKENS_PER_MASK,))
    valid = [(obj, segs) for obj, segs in zip(objects, all_segs) if obj.valid]
    if not valid:
        return objects
    codes = torch.tensor([segs for _, segs in valid])  # [objects, 16]
    logits = vqvae.decode_codes(codes).float().cpu().numpy()  # [objects, 64, 64]
    for (obj, _), small in zip(valid, logits):
        obj.mask = np.zeros(image_size, dtype=bool)
        y_min, x_min, y_max, x_max = _pixel_edges(obj.box, divisor)
        if y_max > y_min and x_max > x_min:  # a box thinner than a pixel keeps an empty mask
            resized = Image.fromarray(small).resize((x_max - x_min, y_max - y_min), Image.BILINEAR)
            obj.mask[y_min:y_max, x_min:x_max] = np.asarray(resized) > 0
    return objects


# ----------------------------------------------------------------------------- training targets


def box_to_loc_string(box: Box, image_size: tuple[int, int], divisor: int = 1024) -> str:
    """Four `<locNNNN>` tokens for a pixel box: clip(round(coord / size * divisor), 0, 1023).

    The inverse of the parsers' de-quantisation with the same divisor (1023 is big_vision's
    RefCOCO encoder exactly); the round-trip error is bounded in the module docstring.
    """
    _check_divisor(divisor)
    height, width = image_size
    normalised = np.asarray(box, dtype=np.float64) / (height, width, height, width)
    locs = np.clip(np.round(normalised * divisor), 0, NUM_LOC_TOKENS - 1).astype(int)
    return "".join(f"<loc{loc:04d}>" for loc in locs)


def mask_to_target(mask: np.ndarray, box: Box, vqvae: MaskVQVAE, divisor: int = 1023) -> str:
    """The 4 `<loc>` + 16 `<seg>` target string of a full-resolution mask [height, width] and its box.

    As big_vision's `refcoco_mask2str`: crop the mask to the rounded pixel box, resize it to
    64x64 (bilinear, antialiased) in [0, 1], and encode it with the VQ-VAE.
    """
    mask = np.asarray(mask, dtype=np.float32)  # [height, width]
    y_min, x_min, y_max, x_max = np.round(np.asarray(box, dtype=np.float64)).astype(int)
    y_min, y_max = np.clip([y_min, y_max], 0, mask.shape[0])
    x_min, x_max = np.clip([x_min, x_max], 0, mask.shape[1])
    if y_max <= y_min or x_max <= x_min:
        raise ValueError(f"box {tuple(box)} covers no pixel of a {mask.shape} mask")
    crop = torch.from_numpy(mask[y_min:y_max, x_min:x_max].copy())[None, None]  # [1, 1, y_max - y_min, x_max - x_min]
    resized = F.interpolate(crop, size=(MASK_SIZE, MASK_SIZE), mode="bilinear", antialias=True)  # [1, 1, 64, 64]
    codes = vqvae.encode_masks(resized[:, 0].clamp(0, 1))[0]  # [16]
    seg_string = "".join(f"<seg{code:03d}>" for code in codes.tolist())
    return box_to_loc_string(box, mask.shape, divisor) + seg_string


# ----------------------------------------------------------------------------- drawing

_PALETTE = [  # distinct, readable colours; a label always gets the same one
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128),
]


def label_colour(label: str) -> tuple[int, int, int]:
    """A fixed colour per label (a stable hash, unlike Python's salted `hash`)."""
    return _PALETTE[zlib.crc32(label.encode("utf-8")) % len(_PALETTE)]


def draw(image: Image.Image, objects: Sequence[TaskObject], mask_alpha: float = 0.45) -> Image.Image:
    """A copy of the image (RGB, same size) with masks tinted, boxes outlined and labels written.

    Invalid objects are skipped. Colours follow the label, so all "cat"s look alike.
    """
    base = image.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(overlay)
    font = ImageFont.load_default()
    line = max(2, round(min(base.size) / 150))
    for obj in objects:
        if not obj.valid:
            continue
        colour = label_colour(obj.label)
        if obj.mask is not None:
            tint = Image.new("RGBA", base.size, colour + (round(255 * mask_alpha),))
            overlay.paste(tint, mask=Image.fromarray(np.asarray(obj.mask, dtype=np.uint8) * 255))
        if obj.box is not None:
            y_min, x_min, y_max, x_max = (round(c) for c in obj.box)
            pen.rectangle((x_min, y_min, x_max, y_max), outline=colour + (255,), width=line)
            if obj.label:
                left, top, right, bottom = pen.textbbox((x_min, y_min), obj.label, font=font)
                pen.rectangle((left, top, right + 2 * line, bottom + line), fill=colour + (255,))
                pen.text((x_min + line, y_min), obj.label, fill=(0, 0, 0, 255), font=font)
    return Image.alpha_composite(base, overlay).convert("RGB")


# ----------------------------------------------------------------------------- metrics


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (y_min, x_min, y_max, x_max) boxes; 0 if both are empty."""
    height = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    width = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = height * width
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def normalize_answer(text: str) -> str:
    """Light answer normalisation: clean, case-fold, collapse spaces, drop a final period."""
    return " ".join(clean_text(text).casefold().split()).removesuffix(".").strip()


@dataclass
class DetectionCounts:
    """Matched, predicted and ground-truth object counts; add them up over a dataset."""

    true_positives: int = 0
    predicted: int = 0
    ground_truth: int = 0

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        return DetectionCounts(
            self.true_positives + other.true_positives,
            self.predicted + other.predicted,
            self.ground_truth + other.ground_truth,
        )

    @property
    def precision(self) -> float:
        """Share of predicted objects that matched (1 when nothing was predicted)."""
        return self.true_positives / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        """Share of ground-truth objects that were found (1 when there were none)."""
        return self.true_positives / self.ground_truth if self.ground_truth else 1.0


def count_detections(
    predicted: Sequence[TaskObject], ground_truth: Sequence[TaskObject], iou_threshold: float = 0.5
) -> DetectionCounts:
    """Greedy matching for precision and recall at IoU >= iou_threshold, for one image.

    Predictions are taken in output order; each claims the unmatched ground-truth box of the same
    (normalised) label with the highest IoU, if that IoU reaches the threshold. Invalid
    predictions count as predicted and never match (they are false positives).
    """
    taken = [False] * len(ground_truth)
    true_positives = 0
    for pred in predicted:
        if not pred.valid or pred.box is None:
            continue
        best, best_iou = None, iou_threshold
        for j, truth in enumerate(ground_truth):
            if taken[j] or normalize_answer(truth.label) != normalize_answer(pred.label):
                continue
            iou = box_iou(pred.box, truth.box)
            if iou >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            taken[best] = True
            true_positives += 1
    return DetectionCounts(true_positives, len(predicted), len(ground_truth))


def mask_iou(predicted: np.ndarray | None, target: np.ndarray) -> float:
    """IoU of two boolean masks [height, width]; None (an invalid prediction) scores 0, two empties 1."""
    if predicted is None:
        return 0.0
    predicted, target = np.asarray(predicted, dtype=bool), np.asarray(target, dtype=bool)
    if predicted.shape != target.shape:
        raise ValueError(f"mask shapes differ: predicted {predicted.shape}, target {target.shape}")
    union = np.logical_or(predicted, target).sum()
    return float(np.logical_and(predicted, target).sum() / union) if union else 1.0


def mean_iou(predicted: Sequence[np.ndarray | None], targets: Sequence[np.ndarray]) -> float:
    """RefCOCO mIoU: the mean of per-example mask IoUs, invalid (None) predictions scoring 0.

    For RefCOCO the prediction of an example is the mask of the first parsed object, or None
    when there is none or it is invalid.
    """
    if len(predicted) != len(targets) or not targets:
        raise ValueError(f"need as many predictions as targets (> 0), got {len(predicted)} and {len(targets)}")
    return float(np.mean([mask_iou(p, t) for p, t in zip(predicted, targets)]))


def exact_match(prediction: str, target: str) -> bool:
    """Whether the answer equals the target after `normalize_answer` on both."""
    return normalize_answer(prediction) == normalize_answer(target)


_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?")


def _to_number(text: str) -> float | None:
    """The number a normalised answer spells ("1,234.5", "45%" -> 1234.5, 45), or None."""
    text = text.replace(",", "").removesuffix("%").strip()
    return float(text) if _NUMBER.fullmatch(text) else None


def relaxed_match(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy: numbers may differ by `tolerance` relative to the target.

    When both answers are numbers (thousands commas and a trailing % are ignored), the answer is
    right if |prediction - target| <= tolerance * |target| (exactly equal for a target of 0);
    otherwise it falls back to `exact_match`.
    """
    pred, true = normalize_answer(prediction), normalize_answer(target)
    pred_number, true_number = _to_number(pred), _to_number(true)
    if pred_number is None or true_number is None:
        return pred == true
    return abs(pred_number - true_number) <= tolerance * abs(true_number)


def _ngrams(text: str, max_n: int) -> Counter:
    """Counts of all 1..max_n-grams of the lower-cased words of a caption."""
    words = re.findall(r"\w+", text.casefold())
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D of captions against reference sets (x100 gives the paper's numbers).

    Each n-gram is weighted by tf-idf, with document frequencies counted over the images'
    reference sets; per n, the candidate and each reference are compared by the cosine of their
    vectors with the candidate's weights clipped to the reference's, times a Gaussian penalty on
    the length difference (sigma = 6); scores are averaged over n and references, times 10,
    then over images. Identical captions score highest, an empty caption scores 0.
    """
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"need one reference set per candidate, got {len(candidates)} and {len(references)}")
    candidate_counts = [_ngrams(c, max_n) for c in candidates]
    reference_counts = [[_ngrams(r, max_n) for r in refs] for refs in references]
    document_frequency = Counter(gram for refs in reference_counts for gram in set().union(*refs))
    log_images = math.log(len(candidates))

    def vectors(counts: Counter) -> tuple[list[dict], list[float], int]:
        """tf-idf weights split by n, their norms, and the caption length in words."""
        weights = [{} for _ in range(max_n)]
        for gram, count in counts.items():
            weights[len(gram) - 1][gram] = count * (log_images - math.log(max(1.0, document_frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in by_n.values())) for by_n in weights]
        return weights, norms, sum(count for gram, count in counts.items() if len(gram) == 1)

    scores = []
    for counts, refs in zip(candidate_counts, reference_counts):
        cand_weights, cand_norms, cand_length = vectors(counts)
        total = 0.0
        for ref in refs:
            ref_weights, ref_norms, ref_length = vectors(ref)
            penalty = math.exp(-((cand_length - ref_length) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                if cand_norms[n] and ref_norms[n]:
                    # "-D": a candidate n-gram counts at most as often as in the reference.
                    dot = sum(min(w, ref_weights[n].get(g, 0.0)) * ref_weights[n].get(g, 0.0)
                              for g, w in cand_weights[n].items())
                    total += penalty * dot / (cand_norms[n] * ref_norms[n]) / max_n
        scores.append(10.0 * total / max(1, len(refs)))
    return float(np.mean(scores))
