"""Two-view augmentation after the MoCo v3 / BYOL asymmetric recipe.

The recipe at 224 px (both views): random resized crop with scale (0.08, 1), colour jitter
(0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale with p 0.2, horizontal flip. View 1 is always
blurred; view 2 is blurred with p 0.1 and solarized with p 0.2.

For 8x8 grayscale digits upsampled to 16 px (:class:`DigitsBatchTwoView`) the recipe changes:

- Crop scale starts at ``crop_min_scale`` (0.3 in the digits preset): 8% of a digit is a
  stroke fragment that carries no class information.
- No horizontal flip: digits have a handedness, and a mirrored 2, 3 or 7 is not a digit.
- Colour jitter keeps brightness and contrast only; saturation, hue and random grayscale
  have no meaning on one channel.
- The blur kernel is 3 px with sigma in (0.1, 1.0), the recipe's 23 px and sigma
  (0.1, 2.0) scaled down to a 16 px image while still visibly softening strokes.
- Solarization inverts values above 0.5, the middle of the [0, 1] range, as on RGB images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[torch.Tensor], torch.Tensor]


class TwoViews:
    """Apply two different transforms to one image and return both views."""

    def __init__(self, view1: Transform, view2: Transform) -> None:
        self.view1 = view1
        self.view2 = view2

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(image), self.view2(image)


class DigitsBatchTwoView:
    """The digits views, drawn independently per image but computed for a whole batch at once.

    Per-image torchvision transforms cost about 0.2 s per 256-image batch of 16 px images on a
    2-core CPU, about half a training step (benchmarks/augment_views.py), so the same
    operations run here as batched tensor ops on the training device. Each image gets its
    own crop, jitter, blur and solarization draws from the global torch RNG. Two differences
    from torchvision's versions: the crop box is clamped to the image instead of re-drawn,
    and brightness is always applied before contrast.
    """

    def __init__(self, img_size: int, crop_min_scale: float, mean: float, std: float) -> None:
        self.img_size = img_size
        self.crop_min_scale = crop_min_scale
        self.mean = mean
        self.std = std

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return two normalised views of ``images``, shape (B, 1, H, W) with values in [0, 1]."""
        view1 = self._view(images, blur_p=1.0, solarize_p=0.0)
        view2 = self._view(images, blur_p=0.1, solarize_p=0.2)
        return view1, view2

    def _view(self, images: torch.Tensor, blur_p: float, solarize_p: float) -> torch.Tensor:
        x = self._resized_crop(images)
        x = self._jitter(x, p=0.8, strength=0.4)
        x = self._blur(x, p=blur_p, sigma=(0.1, 1.0))
        x = self._solarize(x, p=solarize_p, threshold=0.5)
        return (x - self.mean) / self.std

    def _uniform(self, batch: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(batch, device=like.device, dtype=like.dtype).uniform_(low, high)

    def _chosen(self, batch: int, p: float, like: torch.Tensor) -> torch.Tensor:
        # (B, 1, 1, 1) mask of the images a random transform applies to.
        return (torch.rand(batch, device=like.device) < p).view(batch, 1, 1, 1)

    def _resized_crop(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        area = self._uniform(batch, self.crop_min_scale, 1.0, images)
        log_ratio = self._uniform(batch, math.log(3 / 4), math.log(4 / 3), images)
        ratio = log_ratio.exp()
        # Crop width and height as fractions of the image side, clamped to fit inside it.
        width = (area * ratio).sqrt().clamp(max=1.0)
        height = (area / ratio).sqrt().clamp(max=1.0)
        centre_x = (1 - width) * (2 * torch.rand_like(width) - 1)  # in normalised [-1, 1] units
        centre_y = (1 - height) * (2 * torch.rand_like(height) - 1)
        theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
        theta[:, 0, 0] = width
        theta[:, 0, 2] = centre_x
        theta[:, 1, 1] = height
        theta[:, 1, 2] = centre_y
        size = (batch, images.shape[1], self.img_size, self.img_size)
        grid = F.affine_grid(theta, size, align_corners=False)
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode="border", align_corners=False
        )

    def _jitter(self, x: torch.Tensor, p: float, strength: float) -> torch.Tensor:
        batch = x.shape[0]
        shape = (batch, 1, 1, 1)
        brightness = self._uniform(batch, 1 - strength, 1 + strength, x).view(shape)
        contrast = self._uniform(batch, 1 - strength, 1 + strength, x).view(shape)
        jittered = (x * brightness).clamp(0, 1)
        mean = jittered.mean(dim=(1, 2, 3), keepdim=True)
        jittered = ((jittered - mean) * contrast + mean).clamp(0, 1)
        return torch.where(self._chosen(batch, p, x), jittered, x)

    def _blur(self, x: torch.Tensor, p: float, sigma: tuple[float, float]) -> torch.Tensor:
        batch, channels, height, width = x.shape
        sigmas = self._uniform(batch, *sigma, x)
        offsets = torch.tensor([-1.0, 0.0, 1.0], device=x.device, dtype=x.dtype)
        taps = torch.exp(-(offsets[None, :] ** 2) / (2 * sigmas[:, None] ** 2))
        taps = taps / taps.sum(dim=1, keepdim=True)  # (B, 3)
        kernels = (taps[:, :, None] * taps[:, None, :]).view(batch, 1, 3, 3)
        # One group per image: (1, B*C, H, W) convolved with B*C kernels of 3x3.
        padded = F.pad(x.reshape(1, batch * channels, height, width), (1, 1, 1, 1), mode="reflect")
        weight = kernels.repeat_interleave(channels, dim=0)
        blurred = F.conv2d(padded, weight, groups=batch * channels).view_as(x)
        return torch.where(self._chosen(batch, p, x), blurred, x)

    def _solarize(self, x: torch.Tensor, p: float, threshold: float) -> torch.Tensor:
        solarized = torch.where(x >= threshold, 1 - x, x)
        return torch.where(self._chosen(x.shape[0], p, x), solarized, x)


def imagenet_two_view(img_size: int, crop_min_scale: float) -> TwoViews:
    """Build the recipe's views of RGB PIL images as tensors with ImageNet normalisation."""
    # 23 px at 224 px, as in BYOL; kept odd for other sizes.
    kernel = max(3, int(img_size * 0.1) // 2 * 2 + 1)

    def view(blur_p: float, solarize_p: float) -> Transform:
        return v2.Compose(
            [
                v2.RandomResizedCrop(img_size, scale=(crop_min_scale, 1.0), antialias=True),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=(0.1, 2.0))], p=blur_p),
                v2.RandomSolarize(threshold=128, p=solarize_p),
                v2.RandomHorizontalFlip(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ]
        )

    return TwoViews(view(blur_p=1.0, solarize_p=0.0), view(blur_p=0.1, solarize_p=0.2))


def imagenet_eval(img_size: int) -> Transform:
    """Resize to 8/7 of the size, centre crop (224 from 256 at the default size), normalise."""
    return v2.Compose(
        [
            v2.Resize(round(img_size * 8 / 7), antialias=True),
            v2.CenterCrop(img_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )
