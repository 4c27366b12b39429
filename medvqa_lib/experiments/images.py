"""One image cache for every chapter: each distinct image is decoded and resized once."""

from __future__ import annotations

from typing import Any

import torch


class ImageCache:
    """Each distinct image decoded once and resized to ``image_size``.

    :meth:`get` gives the model tensor (``3 x S x S``, normalised to mean/std 0.5) from a
    uint8 copy; :meth:`pil` gives the resized RGB ``PIL.Image`` (for processors that
    normalise themselves, such as PaliGemma's).
    """

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self._pixels: dict[str, torch.Tensor] = {}
        self._images: dict[str, Any] = {}

    @property
    def size(self) -> int:
        """The side length in pixels (alias of ``image_size``)."""
        return self.image_size

    def pil(self, sample: Any) -> Any:
        """The resized RGB ``PIL.Image`` of ``sample``."""
        key = str(sample.image_id)
        if key not in self._images:
            size = (self.image_size, self.image_size)
            self._images[key] = sample.load_image().convert("RGB").resize(size)
        return self._images[key]

    def get(self, sample: Any) -> torch.Tensor:
        """The ``3 x S x S`` float image of ``sample``, normalised to mean/std 0.5."""
        key = str(sample.image_id)
        if key not in self._pixels:
            s = self.image_size
            image = sample.load_image().resize((s, s))
            array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            self._pixels[key] = array.view(s, s, 3).permute(2, 0, 1).clone()
        return self._pixels[key].float().div_(127.5).sub_(1.0)
