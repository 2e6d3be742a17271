import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmagent.images import MAX_PIXELS, ImageError, load_image

WHITE, BLACK, RED, GREEN, BLUE = (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png_bytes(size=(8, 6), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, "PNG")
    return buf.getvalue()


def saved(img, fmt="PNG", **params):
    """Round-trip through a real file format, so Pillow's decoder (not our constructor) picks the mode."""
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def row(mode, values):
    """A 1-pixel-high PIL image of `mode` from a list of pixel values."""
    img = Image.new(mode, (len(values), 1))
    for x, v in enumerate(values):
        img.putpixel((x, 0), v)
    return img


def raw16(mode, values):
    dtype = ">u2" if mode == "I;16B" else "<u2" if mode in ("I;16", "I;16L") else "=u2"
    return Image.frombytes(mode, (len(values), 1), np.array(values, dtype=dtype).tobytes())


def palette(colors, alphas=None, palette_mode="RGB"):
    """A P image (PA when `alphas` is given) showing each palette entry once, left to right."""
    img = Image.new("P" if alphas is None else "PA", (len(colors), 1))
    img.putpalette([c for rgb in colors for c in rgb], palette_mode)
    for x in range(len(colors)):
        img.putpixel((x, 0), x if alphas is None else (x, alphas[x]))
    return img


def pixels(src, **kw):
    img = load_image(src, **kw)
    assert img.mode == "RGB"
    return [tuple(p) for p in np.asarray(img).reshape(-1, 3).tolist()]


def close(got, want, tol):
    return len(got) == len(want) and all(abs(a - b) <= tol for g, w in zip(got, want) for a, b in zip(g, w))


# case: (fixture: file bytes or PIL image, the mode it decodes to, expected RGB pixels, tolerance)
CASES = {
    "1": (saved(Image.fromarray(np.array([[False, True]]))), "1", [BLACK, WHITE], 0),
    "L": (saved(row("L", [0, 128, 255])), "L", [BLACK, (128,) * 3, WHITE], 0),
    "LA": (saved(row("LA", [(0, 255), (0, 0), (0, 128)])), "LA", [BLACK, WHITE, (127,) * 3], 1),
    "L+tRNS": (saved(row("L", [0, 200]), transparency=200), "L", [BLACK, WHITE], 0),
    "P": (saved(palette([RED, BLUE])), "P", [RED, BLUE], 0),
    "P+transparency": (saved(palette([RED, BLUE]), transparency=1), "P", [RED, WHITE], 0),
    "P+palette alpha": (saved(palette([RED, BLUE]), transparency=bytes([255, 128])), "P",
                        [RED, (127, 127, 255)], 1),
    "P RGBA palette": (palette([(*RED, 255), (*BLUE, 0)], palette_mode="RGBA"), "P", [RED, WHITE], 0),
    "PA": (palette([RED, BLUE], alphas=[255, 0]), "PA", [RED, WHITE], 0),
    "I;16": (saved(Image.fromarray(np.array([[0, 257, 32896, 65535]], np.uint16))), "I;16",
             [BLACK, (1,) * 3, (128,) * 3, WHITE], 0),
    "I;16+tRNS": (saved(Image.fromarray(np.array([[0, 1000, 65535]], np.uint16)), transparency=1000), "I;16",
                  [BLACK, WHITE, WHITE], 0),
    "I;16B": (raw16("I;16B", [0, 32896, 65535]), "I;16B", [BLACK, (128,) * 3, WHITE], 0),
    "I;16L": (raw16("I;16L", [0, 32896, 65535]), "I;16L", [BLACK, (128,) * 3, WHITE], 0),
    "I;16N": (raw16("I;16N", [0, 32896, 65535]), "I;16N", [BLACK, (128,) * 3, WHITE], 0),
    "I 8-bit range": (row("I", [-5, 0, 100, 255]), "I", [BLACK, BLACK, (100,) * 3, WHITE], 0),
    "I 16-bit range": (row("I", [0, 32896, 65535]), "I", [BLACK, (128,) * 3, WHITE], 0),
    "I wider range": (row("I", [0, 500_000, 2_000_000]), "I", [BLACK, (64,) * 3, WHITE], 0),
    "F in [0, 1]": (row("F", [0.0, 0.25, 1.0]), "F", [BLACK, (64,) * 3, WHITE], 0),
    "F other range": (row("F", [-3.0, 100.4, 300.0, float("nan")]), "F", [BLACK, (100,) * 3, WHITE, BLACK], 0),
    "RGB": (saved(row("RGB", [RED, GREEN, BLUE])), "RGB", [RED, GREEN, BLUE], 0),
    "RGBA": (saved(row("RGBA", [(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 255, 128)])), "RGBA",
             [RED, WHITE, (127, 127, 255)], 1),
    "RGBA webp": (saved(row("RGBA", [RED + (255,), (0, 0, 0, 0)]), "WEBP", lossless=True), "RGBA", [RED, WHITE], 0),
    "RGBa": (row("RGBa", [(128, 0, 0, 128), (0, 0, 0, 0)]), "RGBa", [(255, 127, 127), WHITE], 1),
    "La": (row("La", [(0, 255), (0, 0)]), "La", [BLACK, WHITE], 0),
    "RGBX": (row("RGBX", [(255, 0, 0, 0)]), "RGBX", [RED], 0),
    "CMYK": (row("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]), "CMYK", [WHITE, (0, 255, 255), BLACK], 0),
    "CMYK jpeg": (saved(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=100), "CMYK",
                  [(0, 255, 255)] * 64, 3),
    "YCbCr": (row("YCbCr", [(255, 128, 128), (0, 128, 128), (76, 85, 255)]), "YCbCr", [WHITE, BLACK, RED], 2),
    "HSV": (row("HSV", [(0, 255, 255), (85, 255, 255)]), "HSV", [RED, GREEN], 1),
    "LAB": (row("LAB", [(128, 128, 128), (255, 128, 128)]), "LAB", [(119,) * 3, WHITE], 2),
    "GIF first frame": (saved(Image.new("RGB", (2, 1), RED), "GIF", save_all=True,
                              append_images=[Image.new("RGB", (2, 1), GREEN)]), "P", [RED, RED], 0),
    "GIF transparency": (saved(palette([RED, BLUE]), "GIF", transparency=1), "P", [RED, WHITE], 0),
    "BMP": (saved(row("RGB", [RED, BLUE]), "BMP"), "RGB", [RED, BLUE], 0),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_mode_decodes_to_the_right_pixels(case):
    fixture, mode, want, tol = CASES[case]
    opened = Image.open(io.BytesIO(fixture)) if isinstance(fixture, bytes) else fixture
    assert opened.mode == mode  # the fixture really exercises the mode this case is about
    got = pixels(fixture)
    assert close(got, want, tol), f"{case}: got {got}, want {want}"


def test_sixteen_bit_png_is_not_white(tmp_path):
    path = tmp_path / "depth16.png"
    Image.fromarray(np.full((4, 4), 12_850, np.uint16)).save(path)  # 12850 / 257 = 50
    assert Image.open(path).mode == "I;16"
    assert set(pixels(path)) == {(50, 50, 50)}


def test_pil_image_is_not_modified():
    img = row("RGBA", [(255, 0, 0, 0)])
    assert pixels(img) == [WHITE]
    assert img.mode == "RGBA" and img.getpixel((0, 0)) == (255, 0, 0, 0)


@pytest.mark.parametrize("arr, want", [
    (np.array([[0, 128, 255]], np.uint8), [BLACK, (128,) * 3, WHITE]),
    (np.array([[[0], [255]]], np.uint8), [BLACK, WHITE]),
    (np.array([[RED, BLUE]], np.uint8), [RED, BLUE]),
    (np.array([[(255, 0, 0, 255), (255, 0, 0, 0)]], np.uint8), [RED, WHITE]),
    (np.array([[0, 32896, 65535]], np.uint16), [BLACK, (128,) * 3, WHITE]),
    (np.array([[0, 32896, 65535]], ">u2"), [BLACK, (128,) * 3, WHITE]),
    (np.array([[(65535, 0, 0)]], np.uint16), [RED]),
    (np.array([[False, True]]), [BLACK, WHITE]),
    (np.array([[0.0, 0.25, 1.0]], np.float32), [BLACK, (64,) * 3, WHITE]),
    (np.array([[[1.0, 0.0, 0.0, 1.0]]], np.float64), [RED]),
    (np.asfortranarray(np.array([[RED, BLUE]], np.uint8)[:, ::-1]), [BLUE, RED]),
], ids=lambda v: str(getattr(v, "dtype", "")) + str(getattr(v, "shape", "")))
def test_numpy_inputs(arr, want):
    assert pixels(arr) == want


@pytest.mark.parametrize("arr, match", [
    (np.zeros((4, 4), np.int64), r"dtype int64; expected uint8, uint16, bool or float in \[0, 1\]; convert it"),
    (np.zeros((4, 4), np.complex64), r"dtype complex64; expected uint8"),
    (np.full((4, 4, 3), 2.0, np.float32), r"float32 with values outside \[0, 1\].*divide by 255"),
    (np.full((4, 4), np.nan), r"NaN"),
    (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\); expected HxW, HxWx1, HxWx3 \(RGB\) or HxWx4"),
    (np.zeros((1, 4, 4, 3), np.uint8), r"shape \(1, 4, 4, 3\).*reshape it"),
    (np.zeros(16, np.uint8), r"shape \(16,\)"),
])
def test_bad_numpy_refused(arr, match):
    with pytest.raises(ImageError, match=match):
        load_image(arr)


def test_all_input_kinds_give_rgb(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(mode="L"))
    arr = np.zeros((6, 8, 3), dtype=np.uint8)
    for src in (path, str(path), png_bytes(), Image.new("RGBA", (8, 6)), arr):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (8, 6)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ImageError, match="nope.png` does not exist"):
        load_image(tmp_path / "nope.png")


def test_corrupt_and_truncated_files_are_refused(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="junk.png` is not a readable image"):
        load_image(junk)
    cut = tmp_path / "cut.png"
    data = png_bytes((64, 64))
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(cut)


def png_header_only(width, height):
    """A PNG that is all header: IHDR claiming width x height, then IEND, and no pixel data at all."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_default_pixel_limit_refuses_without_decoding(tmp_path, monkeypatch):
    assert MAX_PIXELS == 40_000_000
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(10_000, 5_000))  # 50 MP claimed, 57 bytes on disk
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a refused image"))
    with pytest.raises(ImageError, match=r"bomb.png` is 10000x5000 = 50,000,000 pixels, over the limit of "
                                         r"40,000,000; downscale it first or raise max_pixels"):
        load_image(bomb)


def test_huge_image_refused_before_decoding(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(big)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(big, max_pixels=1_000_000)


@pytest.mark.parametrize("src, match", [
    (Image.new("RGB", (0, 0)), r"is empty \(0x0 pixels\); pass an image with at least one pixel"),
    (Image.new("L", (5, 0)), r"is empty \(5x0 pixels\)"),
    (np.zeros((0, 0, 3), np.uint8), r"is empty \(shape \(0, 0, 3\)\)"),
    (np.zeros((4, 0), np.float32), r"is empty"),
    (b"", r"is empty \(0 bytes\)"),
    (png_header_only(0, 0), r"not a readable image"),  # Pillow itself rejects a 0x0 PNG header
], ids=["pil 0x0", "pil 5x0", "numpy 0x0x3", "numpy 4x0", "no bytes", "0x0 png"])
def test_empty_images_refused(src, match):
    with pytest.raises(ImageError, match=match):
        load_image(src)


def test_empty_file_refused(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.png` is empty \(0 bytes\)"):
        load_image(empty)


def test_unsupported_format_refused(tmp_path):
    tif = tmp_path / "a.tiff"
    Image.new("RGB", (4, 4)).save(tif)
    with pytest.raises(ImageError, match="TIFF; supported formats"):
        load_image(tif)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 40)
