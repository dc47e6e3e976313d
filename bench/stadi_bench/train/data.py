"""The training images: photographs and figures that ship inside scikit-image and scikit-learn, each with a
caption naming what it shows, served as augmented batches (square crops, flips, colour jitter) drawn on the
training device in a few batched operations.

Nothing is downloaded: scikit-image keeps these files in its package (``skimage/data``), scikit-learn its two
sample photographs (``load_sample_images``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# (source, file, caption, may be mirrored); source "skimage" is a file of skimage/data, "sklearn" one of
# sklearn.datasets.load_sample_images(). Text and logos are not mirrored: they would read backwards.
SAMPLES: tuple[tuple[str, str, str, bool], ...] = (
    ("skimage", "astronaut.png", "an astronaut", True),
    ("skimage", "chelsea.png", "a cat", True),
    ("skimage", "coffee.png", "a cup of coffee", True),
    ("skimage", "rocket.jpg", "a rocket on the launch pad", True),
    ("skimage", "camera.png", "a man with a camera", True),
    ("skimage", "coins.png", "old coins", True),
    ("skimage", "moon.png", "the surface of the moon", True),
    ("skimage", "horse.png", "a black horse", True),
    ("skimage", "hubble_deep_field.jpg", "galaxies in deep space", True),
    ("skimage", "retina.jpg", "a retina", True),
    ("skimage", "ihc.png", "stained tissue", True),
    ("skimage", "motorcycle_left.png", "a red motorcycle", True),
    ("skimage", "motorcycle_right.png", "a red motorcycle", True),
    ("skimage", "brick.png", "a brick wall", True),
    ("skimage", "grass.png", "grass", True),
    ("skimage", "gravel.png", "gravel", True),
    ("skimage", "color.png", "a colour wheel", True),
    ("skimage", "chessboard_RGB.png", "a chessboard", True),
    ("skimage", "cell.png", "a cell under a microscope", True),
    ("skimage", "phantom.png", "a phantom", True),
    ("skimage", "logo.png", "the scikit-image logo", False),
    ("skimage", "page.png", "a page of text", False),
    ("skimage", "text.png", "handwritten maths", False),
    ("sklearn", "china.jpg", "a chinese temple", True),
    ("sklearn", "flower.jpg", "a flower", True),
)
CAPTIONS: tuple[str, ...] = tuple(sorted({caption for _, _, caption, _ in SAMPLES}))
CROP = (0.7, 1.0)  # a crop's side, as a share of the image's shorter side
JITTER = 0.1  # brightness, contrast and saturation vary by up to this share


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB; grey images repeated, an alpha channel composited on white."""
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.shape[-1] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255.0
        image = (image[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(image[..., :3])


def load_samples() -> list[tuple[np.ndarray, str, bool]]:
    """Every sample image (uint8 RGB) with its caption and whether it may be mirrored."""
    import skimage
    import skimage.io
    from sklearn.datasets import load_sample_images

    sklearn_images = dict(zip(["china.jpg", "flower.jpg"], load_sample_images().images, strict=True))
    folder = Path(skimage.__file__).parent / "data"
    out = []
    for source, name, caption, mirror in SAMPLES:
        image = sklearn_images[name] if source == "sklearn" else skimage.io.imread(folder / name)
        out.append((_rgb(np.asarray(image)), caption, mirror))
    return out


@dataclass
class Batches:
    """Augmented batches of ``size``² images in [-1, 1] with the index of their caption in ``CAPTIONS``.

    An image is a random square crop of ``CROP`` of its shorter side at a random place, mirrored half the time
    where it may be, with brightness, contrast and saturation jittered by up to ``JITTER``. The images wait on
    the device, resized once so that their shorter side is 1.25 times ``size``, on one zero-padded canvas, so a
    batch is one ``grid_sample``."""

    canvas: torch.Tensor  # (N, 3, H, W) in [0, 1]
    extents: torch.Tensor  # (N, 2): each image's height and width on the canvas
    captions: torch.Tensor  # (N,): index into CAPTIONS
    mirrors: torch.Tensor  # (N,) bool
    size: int
    generator: torch.Generator

    @classmethod
    def of(cls, samples: list[tuple[np.ndarray, str, bool]], size: int, device: torch.device, seed: int) -> Batches:
        shorter = round(1.25 * size)
        images = []
        for image, _, _ in samples:
            t = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
            scale = shorter / min(t.shape[-2:])
            hw = (max(shorter, round(t.shape[-2] * scale)), max(shorter, round(t.shape[-1] * scale)))
            images.append(F.interpolate(t, size=hw, mode="bilinear", antialias=True, align_corners=False)[0])
        height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
        canvas = torch.zeros(len(images), 3, height, width)
        for n, image in enumerate(images):
            canvas[n, :, :image.shape[1], :image.shape[2]] = image
        return cls(canvas.to(device), torch.tensor([i.shape[1:] for i in images], dtype=torch.float32),
                   torch.tensor([CAPTIONS.index(c) for _, c, _ in samples]),
                   torch.tensor([m for _, _, m in samples]), size, torch.Generator("cpu").manual_seed(seed))

    def draw(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` augmented images of random samples, and the index of each one's caption."""
        g = self.generator
        picks = torch.randint(len(self.canvas), (batch,), generator=g)
        h, w = self.extents[picks].unbind(-1)
        side = torch.minimum(h, w) * (CROP[0] + (CROP[1] - CROP[0]) * torch.rand(batch, generator=g))
        top = (h - side) * torch.rand(batch, generator=g)
        left = (w - side) * torch.rand(batch, generator=g)
        flip = self.mirrors[picks] & (torch.rand(batch, generator=g) < 0.5)
        full_h, full_w = self.canvas.shape[-2:]
        # output coordinates in [-1, 1] -> canvas coordinates in [-1, 1] (affine_grid, align_corners=False)
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0] = torch.where(flip, -side, side) / full_w
        theta[:, 0, 2] = (2 * left + side) / full_w - 1
        theta[:, 1, 1] = side / full_h
        theta[:, 1, 2] = (2 * top + side) / full_h - 1
        device = self.canvas.device
        grid = F.affine_grid(theta.to(device), [batch, 3, self.size, self.size], align_corners=False)
        images = F.grid_sample(self.canvas[picks.to(device)], grid, mode="bilinear", align_corners=False)
        bright, contrast, saturation = (1.0 + 2 * JITTER * (torch.rand(3, batch, 1, 1, 1, generator=g) - 0.5)
                                        ).to(device).unbind(0)
        grey = images.mean(1, keepdim=True)
        images = grey + (images - grey) * saturation
        mean = images.mean((1, 2, 3), keepdim=True)
        images = ((images - mean) * contrast + mean) * bright
        return images.clamp(0.0, 1.0) * 2.0 - 1.0, self.captions[picks]
