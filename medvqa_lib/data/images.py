"""Image opening with errors that say which file is wrong and what to do."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from medvqa_lib.errors import DataError


def open_image(image: Any) -> Image.Image:
    """Return ``image`` as an RGB ``PIL.Image``.

    ``image`` may be a ``PIL.Image``, a path, or a ``{"bytes": ..., "path": ...}`` dict as the
    Hugging Face ``datasets`` Image feature stores it.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict) and image.get("bytes") is not None:
        import io

        try:
            with Image.open(io.BytesIO(image["bytes"])) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"corrupt image bytes for {image.get('path')!r}: {e}") from e
    if isinstance(image, dict) and image.get("path"):
        image = image["path"]
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise DataError(
                f"image file not found: {path}. Check the dataset folder (MEDVQA_DATA_DIR or the "
                "`root=` argument) and that the images were extracted next to the JSON files."
            )
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(
                f"corrupt or unreadable image: {path} ({e}). Re-download or replace this file."
            ) from e
    raise DataError(f"cannot open an image from a {type(image).__name__}: {image!r}")
