"""The edge runtime's image preprocessing (PIL + numpy, no torch) against transformers' own processor, for the
processor configurations the real checkpoints ship, on images that are not square."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmagent.backends.edge import preprocess
from mmagent.export.bundle import ExportError, image_spec

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def processors():
    from transformers import BlipImageProcessor, CLIPImageProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    return {
        # Salesforce/blip2-*, instructblip-*: a fixed square
        "blip": BlipImageProcessor(size={"height": 48, "width": 48}),
        # llava-hf/llava-1.5-*-hf (CLIPImageProcessor, 336 -> 336 here at a tenth): shortest edge, centre crop
        "llava-1.5": CLIPImageProcessor(size={"shortest_edge": 34}, crop_size={"height": 34, "width": 34},
                                        image_mean=CLIP_MEAN, image_std=CLIP_STD),
        # a crop larger than the resized image: transformers pads with zeros around it
        "crop-larger": CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 26, "width": 24}),
        # LLaVA's own processor with LLaVA-1.5's pad-to-square (original repo's image_aspect_ratio = pad)
        "llava-pad": LlavaImageProcessorPil(size={"shortest_edge": 34}, crop_size={"height": 34, "width": 34},
                                            do_pad=True, image_mean=CLIP_MEAN, image_std=CLIP_STD),
    }


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: a resize filter or an off-by-one crop changes many values."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))


SHAPES = [(97, 41), (41, 97), (64, 64), (35, 200), (13, 9)]  # wide, tall, square, very thin, smaller than the crop


@pytest.mark.parametrize("name", ["blip", "llava-1.5", "crop-larger", "llava-pad"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_edge_preprocess_matches_transformers(name, shape):
    processor = processors()[name]
    image = photo(*shape, seed=shape[0])
    ours = preprocess(image, image_spec(processor, 0))
    theirs = processor(images=[image], return_tensors="np").pixel_values
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1e-6  # measured: 0.0, the same arithmetic


def test_the_llava_steps_are_recorded_and_matter():
    """Each recorded step changes the pixels of a non-square image, so a spec that lost one would show."""
    ps = processors()
    spec, padded = image_spec(ps["llava-1.5"], 34), image_spec(ps["llava-pad"], 34)
    assert spec["resize"] == {"shortest_edge": 34} and spec["crop"] == {"height": 34, "width": 34}
    assert not spec["pad_to_square"] and padded["pad_to_square"]
    image = photo(97, 41, seed=1)
    squashed = preprocess(image, {**spec, "resize": {"height": 34, "width": 34}, "crop": None})  # the old edge
    assert np.abs(preprocess(image, spec) - squashed).max() > 0.5
    assert np.abs(preprocess(image, padded) - preprocess(image, spec)).max() > 0.5


def test_an_old_manifest_still_resizes_to_its_square():
    spec = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resample": 3}  # written before the steps were
    out = preprocess(photo(50, 20, seed=2), spec)
    assert out.shape == (1, 3, 32, 32)


def test_a_size_rule_the_edge_cannot_repeat_is_refused():
    from transformers import CLIPImageProcessor
    odd = CLIPImageProcessor(size={"shortest_edge": 30, "longest_edge": 60}, crop_size={"height": 30, "width": 30})
    with pytest.raises(ExportError, match="shortest_edge.*longest_edge|longest_edge.*shortest_edge"):
        image_spec(odd, 30)
