"""The segmentation mask tokenizer: a VQ-VAE that turns a 64x64 mask into 16 codes and back.

PaliGemma writes a segmentation mask as 4 `<loc>` tokens (the box) followed by 16 `<seg>`
tokens. The 16 tokens come from this VQ-VAE: the mask is cropped to its box, resized to 64x64,
encoded to a 4x4 grid of vectors, and each vector is replaced by the index of its nearest entry
in a 128-entry codebook (row-major order). Decoding looks the 16 indices up and runs a small
up-sampling CNN back to 64x64 (docs/tasks.md §4). The architecture is that of Ning et al. 2023
("All in Tokens", arXiv 2301.02229); the official weights are `vae-oid.npz` (trained on
OpenImages), a PyTorch state dict saved with numpy.

Design choices:
- Module names equal the official keys (`encoder.8.net.0.weight`, `_vq_vae._embedding`,
  `decoder.4.weight`, ...), so loading is a plain name -> tensor mapping with no renaming.
  `encoder` and `decoder` are `nn.Sequential`s whose ReLUs occupy the odd indices, exactly as in
  the original code, which is why the official keys skip numbers.
- Widths. The official file has: encoder 1 -> 16 -> 32 -> 64 -> 128 (four 4x4 stride-2 convs),
  two residual blocks of width 128, a 1x1 conv to E = 512; codebook [128, 512]; decoder 1x1 conv
  512 -> 128, two residual blocks of width 128, four 4x4 transposed convs 128 -> 128 -> 64 ->
  32 -> 16 and a 1x1 conv to one channel. These numbers come from the AiT instance-mask config
  (hidden_dim 16, doubling per down-sampling layer, codebook_dim 512, 128 tokens) and agree with
  the big_vision decoder (128, then halving). Nothing is hard-coded for loading, though:
  `VQVAEConfig.from_state_dict` reads every width and E from the file's shapes.
- Padding. big_vision encodes with TF `padding='SAME'`; for a 4x4 kernel, stride 2 and an even
  input size SAME pads one pixel on each side, which is PyTorch `padding=1` (64 -> 32 -> 16 ->
  8 -> 4). The 3x3 convs use padding 1 and the 1x1 convs none, also equal to SAME. The decoder's
  `ConvTranspose2d(k=4, s=2, p=1)` exactly doubles the size and is what the official PyTorch
  weights were trained with (big_vision reproduces it with explicit flax padding 2).
- Values. Masks in [0, 1] enter the encoder as 2 * (m - 0.5), in [-1, 1]; the decoder output is
  a logit-like map "roughly in [-1, 1]" that callers threshold at 0.
- Loading is strict: every missing, unexpected, mis-shaped or non-float tensor is named (with
  both shapes) in one BadInput, as is a file that cannot be read. The only tolerated extras
  are the exponential-moving-average statistics of the original training code
  (`_vq_vae._ema_w`, `_vq_vae._ema_cluster_size`), which inference never uses; they are named
  explicitly, not silenced by a blanket `strict=False`.
- Training (for tiny models that need a tokenizer of their own): plain VQ-VAE of van den Oord et
  al. 2017 - mean squared reconstruction error against the [-1, 1] target (the official
  objective, so threshold 0 still means "inside"), codebook loss plus 0.25 x commitment loss,
  straight-through gradients through the quantiser. Two standard measures make it reliable on a
  CPU budget: the codebook starts as a random sample of encoder outputs, and codes left unused
  for a while are restarted on random encoder outputs (no dead codes).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .checkpoint import read_npz, read_safetensors_file
from .files import BadInput, MissingFile, atomic_write
from .layouts import bounded
from .schedules import cosine_schedule

MASK_SIZE = 64  # masks are resized to 64x64 before encoding
GRID_SIZE = 4  # four stride-2 layers: 64 -> 4, so 4x4 = 16 codes per mask
NUM_DOWNSAMPLE = 4
NUM_RES_BLOCKS = 2

# Training statistics of the original EMA quantiser; allowed in a file, never used.
_IGNORED_KEYS = ("_vq_vae._ema_w", "_vq_vae._ema_cluster_size")


@dataclass(frozen=True)
class VQVAEConfig:
    """Sizes of the mask VQ-VAE. The defaults are the official `vae-oid.npz`."""

    num_codes: int = 128
    embed_dim: int = 512  # E: size of a codebook vector
    encoder_widths: tuple[int, ...] = (16, 32, 64, 128)  # output of each stride-2 conv
    decoder_widths: tuple[int, ...] = (128, 128, 64, 32, 16)  # res-block width, then each up-conv

    def __post_init__(self):
        if len(self.encoder_widths) != NUM_DOWNSAMPLE or len(self.decoder_widths) != NUM_DOWNSAMPLE + 1:
            raise ValueError(
                f"the VQ-VAE has {NUM_DOWNSAMPLE} down- and up-sampling layers; got encoder_widths="
                f"{self.encoder_widths}, decoder_widths={self.decoder_widths}"
            )

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, tuple[int, ...]], origin: str = "state dict") -> VQVAEConfig:
        """Read the sizes from tensor shapes (e.g. of `vae-oid.npz`) so any width loads."""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            if key not in shapes:
                raise BadInput(f"{origin}: missing tensor '{key}', needed to infer the VQ-VAE sizes")
            if len(shapes[key]) != ndim or 0 in shapes[key]:
                raise BadInput(f"{origin}: tensor '{key}' has shape {tuple(shapes[key])}, expected {ndim}-D "
                               "with no zero size")
            return tuple(shapes[key])

        num_codes, embed_dim = shape("_vq_vae._embedding", 2)
        encoder_widths = tuple(shape(f"encoder.{2 * i}.weight", 4)[0] for i in range(NUM_DOWNSAMPLE))
        # decoder.0 is Conv2d [out, in, 1, 1]; the up-convs are ConvTranspose2d [in, out, k, k].
        up_widths = tuple(shape(f"decoder.{4 + 2 * i}.weight", 4)[1] for i in range(NUM_DOWNSAMPLE))
        decoder_widths = (shape("decoder.0.weight", 4)[0], *up_widths)
        return cls(num_codes, embed_dim, encoder_widths, decoder_widths)


# A tokenizer small enough to train on a laptop CPU in under a minute (see train_vqvae).
TINY_CONFIG = VQVAEConfig(
    num_codes=128, embed_dim=32, encoder_widths=(8, 16, 32, 64), decoder_widths=(64, 64, 32, 16, 8)
)


class ResBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv1x1, plus the input (no ReLU after the add)."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Codebook(nn.Module):
    """The 128 code vectors and the nearest-neighbour lookup that quantises encoder outputs."""

    def __init__(self, num_codes: int, embed_dim: int):
        super().__init__()
        # The leading underscore is the official key name (`_vq_vae._embedding`).
        bound = 1 / num_codes
        self._embedding = nn.Parameter(torch.empty(num_codes, embed_dim).uniform_(-bound, bound))  # [codes, E]

    @property
    def vectors(self) -> torch.Tensor:
        return self._embedding  # [codes, E]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the closest code (squared L2) for each row of z [rows, E] -> [rows]."""
        e = self._embedding
        distances = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.T  # [rows, codes]
        return distances.argmin(dim=1)  # [rows]

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors for integer codes of any shape [...] -> [..., E]."""
        return F.embedding(codes, self._embedding)


class MaskVQVAE(nn.Module):
    """Encoder, codebook and decoder; module names equal the official checkpoint keys."""

    def __init__(self, config: VQVAEConfig = VQVAEConfig()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width_in = 1
        for width in config.encoder_widths:  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(width_in, width, 4, stride=2, padding=1), nn.ReLU()]
            width_in = width
        layers += [ResBlock(width_in) for _ in range(NUM_RES_BLOCKS)]
        layers.append(nn.Conv2d(width_in, config.embed_dim, 1))
        self.encoder = nn.Sequential(*layers)  # indices 0,2,4,6 convs; 8,9 res blocks; 10 conv

        self._vq_vae = Codebook(config.num_codes, config.embed_dim)

        width_in = config.decoder_widths[0]
        layers = [nn.Conv2d(config.embed_dim, width_in, 1), nn.ReLU()]
        layers += [ResBlock(width_in) for _ in range(NUM_RES_BLOCKS)]
        for width in config.decoder_widths[1:]:  # 4 -> 8 -> 16 -> 32 -> 64
            layers += [nn.ConvTranspose2d(width_in, width, 4, stride=2, padding=1), nn.ReLU()]
            width_in = width
        layers.append(nn.Conv2d(width_in, 1, 1))
        self.decoder = nn.Sequential(*layers)  # indices 0 conv; 2,3 res blocks; 4..10 up; 12 conv

    @property
    def codebook(self) -> Codebook:
        return self._vq_vae

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """Continuous latents of masks [B, 64, 64] in [0, 1] -> [B, 16, E] (row-major grid)."""
        if masks.ndim != 3 or tuple(masks.shape[1:]) != (MASK_SIZE, MASK_SIZE):
            raise ValueError(f"masks must be [B, {MASK_SIZE}, {MASK_SIZE}], got {tuple(masks.shape)}")
        param = self._vq_vae.vectors
        x = 2.0 * (masks.to(param) - 0.5)  # [B, 64, 64] in [-1, 1]
        z = self.encoder(x[:, None])  # [B, E, 4, 4]
        return z.flatten(2).transpose(1, 2)  # [B, 16, E]

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook index for every latent vector: [B, 16, E] -> [B, 16]."""
        return self._vq_vae.nearest(z.reshape(-1, z.shape[-1])).view(z.shape[:-1])  # [B, 16]

    def decode(self, vectors: torch.Tensor) -> torch.Tensor:
        """Decoder on a grid of vectors [B, 16, E] -> mask logits [B, 64, 64]."""
        grid = vectors.transpose(1, 2).reshape(-1, vectors.shape[-1], GRID_SIZE, GRID_SIZE)  # [B, E, 4, 4]
        return self.decoder(grid)[:, 0]  # [B, 64, 64]

    @torch.no_grad()
    def encode_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Tokenise masks [B, 64, 64] in [0, 1] into codes [B, 16] (what `<segNNN>` carries)."""
        return self.quantize(self.encode(masks))  # [B, 16]

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Turn codes [B, 16] back into mask logits [B, 64, 64], roughly in [-1, 1]; > 0 is inside."""
        codes = torch.as_tensor(codes, device=self._vq_vae.vectors.device)
        if codes.ndim != 2 or codes.shape[1] != GRID_SIZE * GRID_SIZE:
            raise ValueError(f"codes must be [B, {GRID_SIZE * GRID_SIZE}], got {tuple(codes.shape)}")
        if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < self.config.num_codes):
            low, high = int(codes.min()), int(codes.max())
            raise ValueError(f"codes must lie in [0, {self.config.num_codes}), got {low}..{high}")
        return self.decode(self._vq_vae.lookup(codes.long()))  # [B, 64, 64]


# ----------------------------------------------------------------------------- loading, saving


def _read_tensors(source: str | Path | Mapping) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors by name from an .npz, a .safetensors file or an in-memory state dict."""
    if isinstance(source, Mapping):
        tensors = {k: v if torch.is_tensor(v) else torch.from_numpy(np.asarray(v)) for k, v in source.items()}
        return tensors, "state dict"
    path = Path(source)
    if not path.is_file():
        raise MissingFile(f"VQ-VAE weights not found: {path}")
    if path.suffix == ".npz":
        return read_npz(path), str(path)
    if path.suffix == ".safetensors":
        return read_safetensors_file(path)[0], str(path)
    raise BadInput(f"{path}: unknown VQ-VAE weights format (expected .npz or .safetensors)")


def load_vqvae(source: str | Path | Mapping, device: torch.device | str | None = None) -> MaskVQVAE:
    """Load a VQ-VAE (official `vae-oid.npz`, a saved tiny one, or a state dict), strictly.

    The sizes are read from the shapes; then every expected tensor must be present, float, with
    exactly the expected shape, and nothing unexpected may remain. All that is wrong is named in
    one BadInput (ten tensors per kind at most). Returned in eval mode, float32.
    """
    tensors, origin = _read_tensors(source)
    tensors = {k: v for k, v in tensors.items() if k not in _IGNORED_KEYS}
    config = VQVAEConfig.from_state_dict({k: tuple(v.shape) for k, v in tensors.items()}, origin)
    model = MaskVQVAE(config)
    expected = {key: tuple(param.shape) for key, param in model.state_dict().items()}
    present = [key for key in expected if key in tensors]
    kinds = {
        "missing tensors": [f"'{key}' (expected shape {want})" for key, want in expected.items() if key not in tensors],
        "mis-shaped tensors": [f"'{key}' has shape {tuple(tensors[key].shape)}, expected {expected[key]}"
                               for key in present if tuple(tensors[key].shape) != expected[key]],
        "not floating point": [f"'{key}' is {str(tensors[key].dtype).removeprefix('torch.')}"
                               for key in present if not tensors[key].is_floating_point()],
        "unexpected tensors": [f"'{key}'" for key in sorted(set(tensors) - set(expected))],
    }
    problems = [f"{kind}: {bounded(items)}" for kind, items in kinds.items() if items]
    if problems:
        raise BadInput(f"{origin}: " + "; ".join(problems))
    model.load_state_dict({k: tensors[k].float() for k in expected})
    return model.to(device).eval()


def save_vqvae(model: MaskVQVAE, path: str | Path) -> None:
    """Write the weights in the official key layout, as .npz (like vae-oid.npz) or .safetensors."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".npz":
        atomic_write(path, lambda f: np.savez(f, **{k: v.numpy() for k, v in state.items()}))
    elif path.suffix == ".safetensors":
        atomic_write(path, lambda f: f.write(safetensors_bytes(state)))
    else:
        raise ValueError(f"{path}: choose a .npz or .safetensors file name")


# ----------------------------------------------------------------------------- synthetic masks


# Each shape returns (inside(x, y) -> bool array, low [2], high [2]): a membership test and the
# (x, y) corners of its bounding box, in the shape's own coordinates.


def _ellipse(rng: np.random.Generator):
    a, b = rng.uniform(0.3, 1.0, size=2)
    t = rng.uniform(0, np.pi)
    c, s = np.cos(t), np.sin(t)
    half = np.array([np.hypot(a * c, b * s), np.hypot(a * s, b * c)])  # half-extent in x, y

    def inside(x, y):
        return ((x * c + y * s) / a) ** 2 + ((-x * s + y * c) / b) ** 2 <= 1

    return inside, -half, half


def _convex_polygon(vertices: np.ndarray):
    centre = vertices.mean(0)
    edges = np.roll(vertices, -1, axis=0) - vertices  # [vertices, 2]

    def side(x, y, vertex, edge):  # sign of the 2-D cross product edge x (point - vertex)
        return edge[0] * (y - vertex[1]) - edge[1] * (x - vertex[0])

    orientation = np.sign(side(*centre, vertices[0], edges[0]))

    def inside(x, y):  # on the same side of every edge as the centre
        return np.all([orientation * side(x, y, v, e) >= 0 for v, e in zip(vertices, edges)], axis=0)

    return inside, vertices.min(0), vertices.max(0)


def _rectangle(rng: np.random.Generator):
    w, h = rng.uniform(0.3, 1.0, size=2)
    t = rng.uniform(0, np.pi / 2)
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
    rotation = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return _convex_polygon(corners @ rotation.T)


def _triangle(rng: np.random.Generator):
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=3))
    return _convex_polygon(np.stack([np.cos(angles), np.sin(angles)], axis=1))


def _blob(rng: np.random.Generator):
    n = rng.integers(2, 5)
    centres = rng.uniform(-0.5, 0.5, size=(n, 2))
    radii = rng.uniform(0.25, 0.5, size=n)

    def inside(x, y):
        squared_distances = (x[..., None] - centres[:, 0]) ** 2 + (y[..., None] - centres[:, 1]) ** 2  # [.., n]
        return np.any(squared_distances <= radii**2, axis=-1)

    return inside, (centres - radii[:, None]).min(0), (centres + radii[:, None]).max(0)


_SHAPES = (_ellipse, _rectangle, _triangle, _blob)
MIN_COVERAGE = 0.2


def synthetic_masks(n: int, seed: int | list[int] = 0, size: int = MASK_SIZE) -> np.ndarray:
    """n random masks [n, size, size] bool: ellipses, rectangles, triangles and blobs.

    Like the crops PaliGemma tokenises, each shape is stretched so that its bounding box fills
    the frame (the mask is cropped to its box before it is resized to 64x64). Slivers covering
    less than MIN_COVERAGE of their box are redrawn: real object masks rarely look like that.
    """
    rng = np.random.default_rng(seed)
    centres = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        while masks[i].mean() < MIN_COVERAGE:  # redraw slivers (thin diagonal shapes)
            inside, low, high = _SHAPES[rng.integers(len(_SHAPES))](rng)
            x = low[0] + centres[None, :] * (high[0] - low[0])  # [1, size]
            y = low[1] + centres[:, None] * (high[1] - low[1])  # [size, 1]
            masks[i] = inside(x, y)
    return masks


def synthetic_mask_batches(batch_size: int, seed: int = 0) -> Iterable[torch.Tensor]:
    """An endless stream of batches [batch_size, 64, 64] of synthetic masks, for train_vqvae."""
    for step in itertools.count():
        yield torch.from_numpy(synthetic_masks(batch_size, seed=[seed, step])).float()


# ----------------------------------------------------------------------------- training


def train_vqvae(
    mask_batches: Iterable[torch.Tensor],
    steps: int,
    config: VQVAEConfig = TINY_CONFIG,
    lr: float = 3e-3,
    commitment: float = 0.25,
    restart_every: int = 50,
    seed: int = 0,
) -> MaskVQVAE:
    """Train a mask VQ-VAE from scratch on batches [B, 64, 64] in [0, 1]; returns it in eval mode.

    Loss = MSE(decoder(quantized), 2m - 1) + ||sg(z) - e||^2 + commitment * ||z - sg(e)||^2 with
    straight-through gradients; Adam, linear warm-up over 10% of the steps, then cosine decay.
    Every `restart_every` steps (and at step 0, when none has been used yet), codes unused since
    the last check are moved onto random encoder outputs of the batch, so none stays dead.
    """
    torch.manual_seed(seed)
    model = MaskVQVAE(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(cosine_schedule, total=steps, warmup_fraction=0.1))
    codebook = model.codebook.vectors
    used = torch.zeros(config.num_codes, dtype=torch.bool)
    batches = iter(mask_batches)
    for step in range(steps):
        masks = next(batches, None)
        if masks is None:
            raise ValueError(f"mask_batches ran out after {step} of {steps} steps")
        if step % restart_every == 0:
            with torch.no_grad():
                latents = model.encode(masks).reshape(-1, config.embed_dim)  # [B*16, E]
                dead = (~used).nonzero()[:, 0]  # [dead]
                codebook[dead] = latents[torch.randint(len(latents), (len(dead),))]
            used.zero_()
        z = model.encode(masks)  # [B, 16, E]
        codes = model.quantize(z.detach())  # [B, 16]
        used[codes.flatten()] = True
        quantized = model.codebook.lookup(codes)  # [B, 16, E]
        # Straight-through: the decoder sees the quantised vectors, the encoder gets their gradient.
        logits = model.decode(z + (quantized - z).detach())  # [B, 64, 64]
        reconstruction = F.mse_loss(logits, 2.0 * masks.to(logits) - 1.0)
        codebook_loss = F.mse_loss(quantized, z.detach())
        commitment_loss = F.mse_loss(z, quantized.detach())
        loss = reconstruction + codebook_loss + commitment * commitment_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()
