"""The transforms diffusers' train_dreambooth.py uses (Compose, Resize, CenterCrop, RandomCrop,
ToTensor, Normalize, InterpolationMode), on PIL images, as torchvision computes them: Resize
of an int scales the shorter side to it (PIL's filter, antialiased like torchvision's PIL path),
ToTensor gives float32 CHW in [0, 1]."""

from __future__ import annotations

import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


_PIL = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.BILINEAR: Image.BILINEAR,
        InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.LANCZOS: Image.LANCZOS}


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if isinstance(self.size, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            size = (self.size[1], self.size[0])
        return image.resize(size, _PIL[self.interpolation])


def _crop(image: Image.Image, size, left: int, top: int) -> Image.Image:
    return image.crop((left, top, left + size[1], top + size[0]))


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        return _crop(image, self.size, int(round((w - self.size[1]) / 2.0)), int(round((h - self.size[0]) / 2.0)))


class RandomCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        return _crop(image, self.size, random.randint(0, w - self.size[1]), random.randint(0, h - self.size[0]))


class ToTensor:
    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
