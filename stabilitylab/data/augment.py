"""Two-view augmentation after the MoCo v3 / BYOL asymmetric recipe, with optional local crops.

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

Other data held in memory (CIFAR, MNIST, Fashion-MNIST, npz arrays, small image folders)
gets the recipe itself as batched tensor ops (:func:`recipe_batch_two_view`): the whole
jitter and random grayscale on RGB, brightness and contrast on one channel, a blur kernel
scaled to the image, and a flip where the dataset allows one. Streamed image folders get
the recipe's per-image torchvision transforms (:func:`imagenet_two_view`).

Multi-crop (SwAV, DINO) adds local crops after the two global views, on every path: each
image yields ``[global1, global2, *local_crops]``, all local crops of one side. A local crop
is DINO's local view: a random resized crop with area scale (0.05, 0.4) by default, the
colour jitter with p 0.8, random grayscale with p 0.2 on RGB, a blur with p 0.5, no
solarization, and a flip where the dataset allows one. Its blur has the global views'
kernel and sigma range in pixels, because DINO blurs its 96 px crops with the same radius
range as its 224 px ones. The kernel shrinks only where it would not fit in the crop. The local
crops draw their random numbers after both global views, so turning multi-crop on leaves
the global views of a seed unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from stabilitylab.errors import ConfigError

if TYPE_CHECKING:
    from stabilitylab.config import RunConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[torch.Tensor], torch.Tensor]

# DINO's local crops are 96 px beside 224 px global views.
LOCAL_CROP_FRACTION = 96 / 224


@dataclass(frozen=True)
class LocalCrops:
    """Multi-crop's local crops of each image: how many, their side in pixels, their area.

    ``scale`` is the (min, max) crop area as a fraction of the image.
    """

    count: int
    size: int
    scale: tuple[float, float]


def default_local_crop_size(img_size: int, patch_size: int) -> int:
    """Return 96/224 of ``img_size`` rounded to a whole number of patches, at least one patch."""
    return max(patch_size, round(img_size * LOCAL_CROP_FRACTION / patch_size) * patch_size)


def local_crops_of(config: RunConfig, img_size: int) -> LocalCrops | None:
    """Return the local crops that ``config`` requests on ``img_size`` px images, or None.

    Raises ConfigError when the crop side is larger than the image side, or not a whole
    number of patches. Both are checked here because npz arrays give their own size, known
    only once the data is read.
    """
    if config.local_crops == 0:
        return None
    patch_size = config.resolved_patch_size
    if config.local_crop_size is None:
        size = default_local_crop_size(img_size, patch_size)
        source = f"the default local crop side {size} px (96/224 of the image side)"
    else:
        size = config.local_crop_size
        source = f"--local-crop-size {size}"
    if size % patch_size:
        raise ConfigError(
            f"{source} is not a multiple of --patch-size {patch_size}, so the crops cannot "
            f"be cut into patches; pass a multiple of {patch_size}, such as "
            f"{default_local_crop_size(img_size, patch_size)}"
        )
    if size > img_size:
        raise ConfigError(
            f"{source} is larger than the {img_size} px images; pass --local-crop-size "
            f"{img_size} or less, a multiple of --patch-size {patch_size}"
        )
    return LocalCrops(
        config.local_crops, size, (config.local_crop_min_scale, config.local_crop_max_scale)
    )


def fitting_blur_kernel(kernel: int, size: int) -> int:
    """Return ``kernel``, or the largest odd kernel whose reflect padding fits a ``size`` side."""
    return min(kernel, 2 * size - 1)


class TwoViews:
    """Apply two different transforms to one image, then any local-crop transform.

    Returns ``(view1, view2, *local_crops)``: the local transform runs ``local_count``
    times, after both global views, so the global views do not depend on it.
    """

    def __init__(
        self,
        view1: Transform,
        view2: Transform,
        local: Transform | None = None,
        local_count: int = 0,
    ) -> None:
        if local_count and local is None:
            raise ValueError(f"local_count {local_count} needs a local transform")
        self.view1 = view1
        self.view2 = view2
        self.local = local
        self.local_count = local_count

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        view1, view2 = self.view1(image), self.view2(image)
        if self.local is None:
            return view1, view2
        return (view1, view2, *(self.local(image) for _ in range(self.local_count)))


class BatchTwoView:
    """Two views drawn independently per image but computed for a whole batch at once.

    Per-image torchvision transforms cost about 0.2 s per 256-image batch of 16 px images on a
    2-core CPU, about half a training step (benchmarks/augment_views.py), so the same
    operations run here as batched tensor ops on the training device. Each image gets its
    own crop, jitter, blur, solarization and flip draws from the global torch RNG. Three
    things differ from torchvision's versions. The crop box is clamped to the image instead
    of re-drawn. The jitter always applies brightness, contrast, saturation and hue in this
    order instead of a random one. The flip is drawn last, after solarization.

    ``colour`` adds the RGB parts of the recipe (saturation 0.2 and hue 0.1 in the jitter,
    random grayscale with p 0.2); without it the views suit one channel. ``mean`` and
    ``std`` are one value, or one per channel. ``local_crops`` adds multi-crop's local
    crops after the two global views.
    """

    def __init__(
        self,
        img_size: int,
        crop_min_scale: float,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        *,
        colour: bool = False,
        flip: bool = False,
        blur_kernel: int = 3,
        blur_sigma: tuple[float, float] = (0.1, 1.0),
        local_crops: LocalCrops | None = None,
    ) -> None:
        self.img_size = img_size
        self.crop_min_scale = crop_min_scale
        self.mean = mean
        self.std = std
        self.colour = colour
        self.flip = flip
        self.blur_kernel = blur_kernel
        self.blur_sigma = blur_sigma
        self.local_crops = local_crops

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return the normalised views of ``images`` (B, C, H, W), uint8 or floats in [0, 1].

        The views are ``(view1, view2, *local_crops)``: two global views of the image size,
        then any local crops, each (B, C, S, S) with S the local crop side.
        """
        if images.dtype == torch.uint8:
            images = images.float() / 255
        global_scale = (self.crop_min_scale, 1.0)
        view1 = self._view(images, self.img_size, global_scale, blur_p=1.0, solarize_p=0.0)
        view2 = self._view(images, self.img_size, global_scale, blur_p=0.1, solarize_p=0.2)
        if self.local_crops is None:
            return view1, view2
        crops = self.local_crops
        # Drawn after both global views, so these stay the same with multi-crop on or off.
        local = [
            self._view(images, crops.size, crops.scale, blur_p=0.5, solarize_p=0.0)
            for _ in range(crops.count)
        ]
        return (view1, view2, *local)

    def _view(
        self,
        images: torch.Tensor,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
    ) -> torch.Tensor:
        x = self._resized_crop(images, size, scale)
        x = self._jitter(x, p=0.8, strength=0.4)
        if self.colour:
            x = self._random_grayscale(x, p=0.2)
        x = self._blur(x, p=blur_p, sigma=self.blur_sigma)
        x = self._solarize(x, p=solarize_p, threshold=0.5)
        if self.flip:
            x = torch.where(self._chosen(x.shape[0], 0.5, x), x.flip(-1), x)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.mean, (int, float)) and isinstance(self.std, (int, float)):
            return (x - self.mean) / self.std
        mean = torch.as_tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def _uniform(self, batch: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(batch, device=like.device, dtype=like.dtype).uniform_(low, high)

    def _chosen(self, batch: int, p: float, like: torch.Tensor) -> torch.Tensor:
        # (B, 1, 1, 1) mask of the images a random transform applies to.
        return (torch.rand(batch, device=like.device) < p).view(batch, 1, 1, 1)

    def _resized_crop(
        self, images: torch.Tensor, size: int, scale: tuple[float, float]
    ) -> torch.Tensor:
        """Crop each image with its own box of area fraction in ``scale``, resized to ``size``."""
        batch = images.shape[0]
        area = self._uniform(batch, scale[0], scale[1], images)
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
        output_shape = (batch, images.shape[1], size, size)
        grid = F.affine_grid(theta, output_shape, align_corners=False)
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode="border", align_corners=False
        )

    def _jitter(self, x: torch.Tensor, p: float, strength: float) -> torch.Tensor:
        batch = x.shape[0]
        shape = (batch, 1, 1, 1)
        brightness = self._uniform(batch, 1 - strength, 1 + strength, x).view(shape)
        contrast = self._uniform(batch, 1 - strength, 1 + strength, x).view(shape)
        if self.colour:
            saturation = self._uniform(batch, 1 - 0.2, 1 + 0.2, x).view(shape)
            hue = self._uniform(batch, -0.1, 0.1, x)
        jittered = (x * brightness).clamp(0, 1)
        # torchvision takes the contrast mean over the grayscale image of an RGB image.
        luminance = grayscale(jittered) if self.colour else jittered
        mean = luminance.mean(dim=(1, 2, 3), keepdim=True)
        jittered = ((jittered - mean) * contrast + mean).clamp(0, 1)
        if self.colour:
            gray = grayscale(jittered)
            jittered = ((jittered - gray) * saturation + gray).clamp(0, 1)
            jittered = shift_hue(jittered, hue)
        return torch.where(self._chosen(batch, p, x), jittered, x)

    def _random_grayscale(self, x: torch.Tensor, p: float) -> torch.Tensor:
        gray = grayscale(x).expand_as(x)
        return torch.where(self._chosen(x.shape[0], p, x), gray, x)

    def _blur(self, x: torch.Tensor, p: float, sigma: tuple[float, float]) -> torch.Tensor:
        batch, channels, height, width = x.shape
        kernel = fitting_blur_kernel(self.blur_kernel, min(height, width))
        radius = kernel // 2
        sigmas = self._uniform(batch, *sigma, x)
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        taps = torch.exp(-(offsets[None, :] ** 2) / (2 * sigmas[:, None] ** 2))
        taps = taps / taps.sum(dim=1, keepdim=True)  # (B, kernel)
        kernels = (taps[:, :, None] * taps[:, None, :]).view(batch, 1, kernel, kernel)
        # One group per image channel: (1, B*C, H, W) convolved with B*C kernels.
        padding = (radius, radius, radius, radius)
        padded = F.pad(x.reshape(1, batch * channels, height, width), padding, mode="reflect")
        weight = kernels.repeat_interleave(channels, dim=0)
        blurred = F.conv2d(padded, weight, groups=batch * channels).view_as(x)
        return torch.where(self._chosen(batch, p, x), blurred, x)

    def _solarize(self, x: torch.Tensor, p: float, threshold: float) -> torch.Tensor:
        solarized = torch.where(x >= threshold, 1 - x, x)
        return torch.where(self._chosen(x.shape[0], p, x), solarized, x)


class DigitsBatchTwoView(BatchTwoView):
    """The digits views: one channel, no flip, a 3 px blur with sigma in (0.1, 1.0)."""

    def __init__(
        self,
        img_size: int,
        crop_min_scale: float,
        mean: float,
        std: float,
        local_crops: LocalCrops | None = None,
    ) -> None:
        super().__init__(img_size, crop_min_scale, mean, std, local_crops=local_crops)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Return the luminance (B, 1, H, W) of RGB images with torchvision's ITU-R 601 weights."""
    red, green, blue = x.unbind(dim=1)
    return (0.2989 * red + 0.587 * green + 0.114 * blue).unsqueeze(1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images (B, 3, H, W) in [0, 1] by ``shift`` (B,) turns.

    The image goes to HSV, its hue moves by the shift modulo 1, and it comes back to RGB,
    as torchvision's ``adjust_hue`` does for one image.
    """
    red, green, blue = x.unbind(dim=1)
    value, _ = x.max(dim=1)
    delta = value - x.min(dim=1).values
    saturation = torch.where(value > 0, delta / value.clamp(min=1e-12), torch.zeros_like(value))
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    # Hue in sixths of a turn; it has no effect where delta is 0, as saturation is 0 there.
    sixths = torch.where(
        value == red,
        (green - blue) / safe_delta,
        torch.where(value == green, 2 + (blue - red) / safe_delta, 4 + (red - green) / safe_delta),
    )
    hue = (sixths / 6 + shift.view(-1, 1, 1)) % 1.0
    # HSV to RGB without branches: channel n of (5, 3, 1) for red, green and blue is
    # v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 hue) mod 6.
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (offsets + 6 * hue.unsqueeze(1)) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * ramp)


def blur_kernel_size(img_size: int) -> int:
    """Return the recipe's blur kernel for ``img_size``: 23 px at 224 px, odd, at least 3."""
    return max(3, int(img_size * 0.1) // 2 * 2 + 1)


def recipe_batch_two_view(
    img_size: int,
    crop_min_scale: float,
    mean: Sequence[float],
    std: Sequence[float],
    flip: bool,
    local_crops: LocalCrops | None = None,
) -> BatchTwoView:
    """Build the recipe's views for images held in memory, one channel or RGB.

    RGB images get the whole recipe; one-channel images the jitter without saturation and
    hue and no random grayscale. The blur kernel scales with the image as at 224 px.
    ``local_crops`` adds multi-crop's local crops after the two global views.
    """
    return BatchTwoView(
        img_size,
        crop_min_scale,
        tuple(mean),
        tuple(std),
        colour=len(mean) == 3,
        flip=flip,
        blur_kernel=blur_kernel_size(img_size),
        blur_sigma=(0.1, 2.0),
        local_crops=local_crops,
    )


def imagenet_two_view(
    img_size: int, crop_min_scale: float, local_crops: LocalCrops | None = None
) -> TwoViews:
    """Build the recipe's views of RGB PIL images as tensors with ImageNet normalisation.

    ``local_crops`` adds multi-crop's local crops after the two global views.
    """
    # 23 px at 224 px, as in BYOL; kept odd for other sizes.
    kernel = blur_kernel_size(img_size)

    def view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> Transform:
        blur = v2.GaussianBlur(kernel_size=fitting_blur_kernel(kernel, size), sigma=(0.1, 2.0))
        return v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale, antialias=True),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([blur], p=blur_p),
                v2.RandomSolarize(threshold=128, p=solarize_p),
                v2.RandomHorizontalFlip(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ]
        )

    global_scale = (crop_min_scale, 1.0)
    view1 = view(img_size, global_scale, blur_p=1.0, solarize_p=0.0)
    view2 = view(img_size, global_scale, blur_p=0.1, solarize_p=0.2)
    if local_crops is None:
        return TwoViews(view1, view2)
    local = view(local_crops.size, local_crops.scale, blur_p=0.5, solarize_p=0.0)
    return TwoViews(view1, view2, local, local_crops.count)


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
