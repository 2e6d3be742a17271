"""Image input for every stage: a path, bytes, a PIL image or a numpy array, checked and made RGB.

Limits are explicit: common formats only, a pixel cap that refuses decompression bombs before they are
decoded, EXIF orientation applied so a phone photo is upright.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF"}
MAX_PIXELS = 40_000_000  # 40 MP: above any camera's full frame, far below a bomb


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says what to do."""


def _describe(src) -> str:
    return f"`{src}`" if isinstance(src, (str, Path)) else f"the {type(src).__name__} image"


def _open(src) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if hasattr(src, "__array_interface__"):
        import numpy as np
        arr = np.asarray(src)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ImageError(f"numpy image must be uint8 HxW or HxWxC, got {arr.dtype} {arr.shape}")
        return Image.fromarray(arr)
    if isinstance(src, (bytes, bytearray)):
        return Image.open(io.BytesIO(src))
    path = Path(src)
    if not path.is_file():
        raise ImageError(f"image `{path}` does not exist; check the path")
    return Image.open(path)


def load_image(src, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, check and decode an image into RGB, or raise ImageError naming it and the fix."""
    name = _describe(src)
    try:  # the size check reads only the header; PIL's own bomb guard covers what opens too big
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(src)
            if image.format is not None and image.format not in FORMATS:
                raise ImageError(f"{name} is {image.format}; supported formats: {', '.join(sorted(FORMATS))}")
            w, h = image.size
            if w * h > max_pixels:
                raise ImageError(f"{name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                                 "downscale it first or raise max_pixels")
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name} is too large to decode safely ({e}); downscale it or raise max_pixels") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is not a readable image ({e}); re-export it as PNG or JPEG") from e
    return image.convert("RGB")
