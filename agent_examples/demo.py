"""The picture the examples use when none is given (a red circle and a blue square)."""


def demo_picture():
    """A red circle and a blue square, so the script runs without an image at hand."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((6, 6, 28, 28), fill="red")
    draw.rectangle((36, 36, 58, 58), fill="blue")
    return img
