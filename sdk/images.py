"""Image input for every stage: a path, bytes, a PIL image or a numpy array, checked and made 8-bit RGB.

Limits are explicit: common formats only, a pixel cap that refuses decompression bombs before they are
decoded, EXIF orientation applied so a phone photo is upright.

Decoding choices (every mode Pillow opens ends up as RGB with the same meaning):
- 16-bit (I;16, I;16B, I;16L, I;16N) is scaled by its bit depth: 65535 -> 255 (value / 257, rounded).
- 32-bit integer (I) carries no bit depth, so its range decides: max <= 255 is taken as 8-bit,
  max <= 65535 as 16-bit, anything larger is scaled by its max; negatives become 0.
- Float (F): values all in [0, 1] are scaled by 255, otherwise clipped to 0..255; NaN becomes 0.
- Transparency (alpha channels, palette or tRNS transparency) is composited on a white background, as a
  viewer shows it; a black one would turn dark line art on a transparent canvas into a black square.
- CMYK, YCbCr, LAB and HSV use Pillow's own conversions (no ICC profile colour management).
- Multi-frame files (animated GIF, WebP, PNG): the first frame is used. A PIL image is used as given,
  i.e. its current frame.
- numpy arrays: HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA) of uint8, uint16 (scaled as above), bool
  (True -> 255) or float in [0, 1] (scaled by 255); anything else is refused.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF"}
MAX_PIXELS = 40_000_000  # 40 MP: above any camera's full frame, far below a bomb
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says what to do."""


def _describe(src) -> str:
    return f"`{src}`" if isinstance(src, (str, Path)) else f"the {type(src).__name__} image"


def _to_uint8(arr: np.ndarray, top: float) -> np.ndarray:
    """Map 0..top linearly onto 0..255, clipping outside it."""
    return np.rint(np.clip(arr.astype(np.float32), 0, top) * np.float32(255 / top)).astype(np.uint8)


def _from_array(arr, name: str) -> Image.Image:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f"{name} has shape {arr.shape}; expected HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA); "
                         "reshape it, e.g. arr.transpose(1, 2, 0) for a CxHxW array")
    if arr.size == 0:
        raise ImageError(f"{name} is empty (shape {arr.shape}); pass an image with at least one pixel")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        arr = _to_uint8(arr, 65535)
    elif arr.dtype.kind == "f":
        if not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
            raise ImageError(f"{name} is {arr.dtype} with values outside [0, 1] (or NaN/inf); "
                             "expected floats in [0, 1]: divide by 255, or pass uint8")
        arr = _to_uint8(arr, 1.0)
    elif arr.dtype != np.uint8:
        raise ImageError(f"{name} has dtype {arr.dtype}; expected uint8, uint16, bool or float in [0, 1]; "
                         "convert it, e.g. arr.astype(np.uint8) for values in 0..255")
    return Image.fromarray(np.ascontiguousarray(arr))


def _open(src, name: str) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if hasattr(src, "__array_interface__"):
        return _from_array(src, name)
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise ImageError(f"{name} is empty (0 bytes); pass the file's contents")
        return Image.open(io.BytesIO(src))
    path = Path(src)
    if not path.is_file():
        raise ImageError(f"image `{path}` does not exist; check the path")
    if path.stat().st_size == 0:
        raise ImageError(f"{name} is empty (0 bytes); re-export or re-download it")
    return Image.open(path)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """I;16*, I and F to 8-bit L (LA when a tRNS value marks transparent pixels), scaled as documented."""
    arr = np.asarray(image)
    if image.mode == "F":
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        top = 1.0 if arr.min() >= 0 and arr.max() <= 1 else 255.0
    elif image.mode == "I":
        hi = int(arr.max())
        top = 255 if hi <= 255 else 65535 if hi <= 65535 else hi
    else:  # I;16 family
        top = 65535
    out = Image.fromarray(_to_uint8(arr, top))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        out.putalpha(Image.fromarray(np.where(arr == transparent, 0, 255).astype(np.uint8)))
    return out


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_l(image)
    elif image.mode == "La":
        image = image.convert("LA")  # Pillow converts premultiplied La only to LA
    transparent = (image.mode in _ALPHA_MODES or "transparency" in image.info
                   or (image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")))
    if not transparent:
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def load_image(src, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, check and decode an image into 8-bit RGB, or raise ImageError naming it and the fix.

    `src` is a path, the file's bytes, a PIL image or a numpy array. Multi-frame files give their first
    frame; transparent pixels are composited on white; 16-bit, 32-bit and float images are scaled to
    0..255 as the module docstring describes.
    """
    name = _describe(src)
    try:  # the size check reads only the header; PIL's own bomb guard covers what opens too big
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(src, name)
            if image.format is not None and image.format not in FORMATS:
                raise ImageError(f"{name} is {image.format}; supported formats: {', '.join(sorted(FORMATS))}")
            w, h = image.size
            if w * h > max_pixels:
                raise ImageError(f"{name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                                 "downscale it first or raise max_pixels")
            if w == 0 or h == 0:
                raise ImageError(f"{name} is empty ({w}x{h} pixels); pass an image with at least one pixel")
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name} is too large to decode safely ({e}); downscale it or raise max_pixels") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is not a readable image ({e}); re-export it as PNG or JPEG") from e
