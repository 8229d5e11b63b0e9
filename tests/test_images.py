"""images: loading to RGB and the CLIP transform, checked against the official tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from cogagent_nb.data.images import CLIP_MEAN, CLIP_STD, image_to_tensor, load_image


def test_matches_official_transform(parity_dir: Path) -> None:
    """template_images.pt holds the official tokenizer's tensors for img0 (first check) and img1."""
    official = torch.load(parity_dir / "template_images.pt", weights_only=True)
    for name, check in (("img0.png", "user_image_assistant/agp=0"), ("img1.png", "system_first/agp=0")):
        ours = image_to_tensor(load_image(parity_dir / name), 112)
        assert ours.dtype == torch.float32 and ours.shape == (3, 112, 112)
        torch.testing.assert_close(ours, official[check][0], atol=1e-5, rtol=0)


def test_constant_image_normalises_per_channel() -> None:
    """A flat colour stays flat through bicubic resizing; each channel is (v/255 − mean)/std."""
    rgb = (255, 128, 0)
    tensor = image_to_tensor(Image.new("RGB", (37, 21), rgb), 14)
    for channel in range(3):
        expected = (rgb[channel] / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        torch.testing.assert_close(tensor[channel], torch.full((14, 14), expected), atol=1e-5, rtol=0)


def test_resize_ignores_aspect_ratio() -> None:
    wide = Image.new("RGB", (300, 100))
    wide.paste((255, 255, 255), (0, 0, 150, 100))  # left half white
    tensor = image_to_tensor(wide, 8)
    assert tensor.shape == (3, 8, 8)
    assert tensor[0, :, 0].gt(0).all() and tensor[0, :, -1].lt(0).all()  # the split stays at the middle column


def test_load_image_converts_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (10, 20, 30, 40)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (10, 20, 30)
    assert load_image(Image.new("L", (2, 2), 7)).mode == "RGB"
    assert load_image(str(path)).size == (4, 4)


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="int"):
        load_image(3)
    with pytest.raises(ValueError, match="positive"):
        image_to_tensor(Image.new("RGB", (2, 2)), 0)
