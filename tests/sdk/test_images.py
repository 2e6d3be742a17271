import io

import numpy as np
import pytest
from PIL import Image

from mmagent.images import ImageError, load_image


def png_bytes(size=(8, 6), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, "PNG")
    return buf.getvalue()


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


def test_huge_image_refused_before_decoding(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(big)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(big, max_pixels=1_000_000)


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


def test_bad_numpy_dtype_refused():
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
