"""A LoRA's training images: a folder of images, each with its caption in a `.txt` beside it (or one prompt for
all), resized into aspect-ratio buckets as kohya's trainer does (every bucket about resolution² pixels, both
sides a multiple of the model's size step), so that wide and tall images are not squashed into a square."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The folder's rules (which files are images, no symlinks) are the serving side's, which validates requests.
from ..jobs.training_requests import IMAGE_SUFFIXES, DatasetError, image_paths
from ..jobs.training_requests import plain_file as _plain_file

MAX_SOURCE_PIXELS = 40_000_000  # refuse decompression bombs before decoding
MAX_CAPTION_CHARS = 2000


@dataclass(frozen=True)
class TrainingImage:
    path: Path
    caption: str
    size: tuple[int, int]       # the source (width, height)
    bucket: tuple[int, int]     # the (width, height) it is trained at


def caption_of(path: Path, prompt: str | None) -> str:
    """The `.txt` beside the image, else the shared prompt."""
    text_file = path.with_suffix(".txt")
    if _plain_file(text_file):
        caption = text_file.read_text(encoding="utf-8", errors="replace")[:MAX_CAPTION_CHARS].strip()
        if caption:
            return caption
    if prompt:
        return prompt
    raise DatasetError(f"{path.name} has no caption: put a {text_file.name} beside it or give one prompt")


def buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution² pixels, sides multiples of `step`, from resolution/2 to
    2·resolution (kohya's defaults for 512: 256 to 1024), sorted by aspect ratio."""
    area = resolution * resolution
    low = max(step, (resolution // 2) // step * step)
    high = 2 * resolution
    found = set()
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            found.update({(width, height), (height, width)})
    return sorted(found, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(size: tuple[int, int], choices: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(size[0] / size[1])
    return min(choices, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def load_dataset(folder: Path, prompt: str | None, resolution: int, step: int, use_buckets: bool = True,
                 max_images: int | None = None) -> list[TrainingImage]:
    from PIL import Image

    paths = image_paths(folder)
    if not paths:
        raise DatasetError(f"image folder {folder.name!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if max_images is not None and len(paths) > max_images:
        raise DatasetError(f"image folder {folder.name!r} holds {len(paths)} images; at most {max_images}")
    choices = buckets(resolution, step) if use_buckets else [(resolution, resolution)]
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                size = image.size
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path.name} cannot be read as an image: {exc}") from None
        if size[0] < 1 or size[1] < 1 or size[0] * size[1] > MAX_SOURCE_PIXELS:
            raise DatasetError(f"{path.name} is {size[0]}x{size[1]}: at most {MAX_SOURCE_PIXELS} pixels")
        images.append(TrainingImage(path, caption_of(path, prompt), size, nearest_bucket(size, choices)))
    return images


def pixels(image: TrainingImage) -> np.ndarray:
    """The image resized to cover its bucket and centre-cropped to it: (3, height, width) float32 in [-1, 1]."""
    from PIL import Image

    width, height = image.bucket
    with Image.open(image.path) as source:
        source = source.convert("RGB")
        scale = max(width / source.width, height / source.height)
        resized = source.resize((max(width, round(source.width * scale)), max(height, round(source.height * scale))),
                                Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    array = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
    return (array / 127.5 - 1.0).transpose(2, 0, 1).copy()


def batches(images: list[TrainingImage], batch_size: int, rng: np.random.Generator) -> list[list[TrainingImage]]:
    """One epoch: the images shuffled, grouped by bucket into batches of up to batch_size, batches shuffled."""
    by_bucket: dict[tuple[int, int], list[TrainingImage]] = {}
    for index in rng.permutation(len(images)):
        by_bucket.setdefault(images[index].bucket, []).append(images[index])
    groups = [members[i:i + batch_size] for _, members in sorted(by_bucket.items())
              for i in range(0, len(members), batch_size)]
    return [groups[i] for i in rng.permutation(len(groups))]


def tag_frequency(images: list[TrainingImage]) -> dict[str, int]:
    """kohya's `ss_tag_frequency` counts: comma-separated caption tags."""
    counts: dict[str, int] = {}
    for image in images:
        for tag in (t.strip() for t in image.caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
