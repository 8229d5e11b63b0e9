"""Screenshot loading and the CLIP image transform that CogAgent's vision tower expects.

The official tokenizer turns an image into a tensor with torchvision's
``Resize((S, S), BICUBIC) → ToTensor() → Normalize(CLIP_MEAN, CLIP_STD)``. On a PIL image, torchvision's
Resize is PIL's own bicubic resize, so this module calls PIL directly and does the rest in float32 torch
arithmetic, in the same order: the result matches the official tensors to ~1e-7 without importing
torchvision. The aspect ratio is *not* kept: a 1920×1080 screenshot is squashed to S×S (1120 for the
real model), exactly as in training and inference of the official model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

# The OpenAI CLIP normalisation constants, used by EVA2-CLIP and so by GLM-4V / CogAgent.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def load_image(path_or_pil: str | Path | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or an image (RGBA screenshots, palettes and greyscale become RGB)."""
    if isinstance(path_or_pil, Image.Image):
        image = path_or_pil
    elif isinstance(path_or_pil, (str, Path)):
        path = Path(path_or_pil)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        with Image.open(path) as opened:
            image = opened.convert("RGB")  # convert() also forces the lazy file read before closing
        return image
    else:
        raise TypeError(f"expected an image path or a PIL image, got {type(path_or_pil).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """The normalised float32 tensor [3, size, size] that the vision tower reads.

    Steps, as in the official transform: bicubic resize to exactly size×size, scale bytes to [0, 1],
    subtract the CLIP mean and divide by the CLIP std per channel.
    """
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    resized = load_image(image).resize((size, size), resample=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())  # (S, S, 3) uint8
    tensor = pixels.permute(2, 0, 1).to(torch.float32).div(255)  # (3, S, S) in [0, 1]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub(mean).div(std)
