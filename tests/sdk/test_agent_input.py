"""Requests the model cannot answer are refused the same way on both backends, never answered with ''."""
import numpy as np
import pytest
from PIL import Image

from mmagent.backends import PromptTooLong
from mmagent.images import ImageError

BACKENDS = ["torch", "edge"]



@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prompt_longer_than_the_context_is_refused(agents, backend, sample_image):
    agent = agents[backend]
    question = "is there a red circle at the top left " * 150 + "?"
    for adapter in ("vqa", None):
        with pytest.raises(PromptTooLong, match=r"the prompt is (\d{4,}) tokens .* the model's context holds 1024, "
                                                r"leaving no room for the answer; shorten the question"):
            agent.ask(sample_image, question, adapter=adapter)
    with pytest.raises(PromptTooLong):
        list(agent.stream(sample_image, question))
    assert agent.ask(sample_image, "is there a circle?", max_new_tokens=2).adapter == "vqa"  # still usable


def test_both_backends_count_the_same_prompt_length(agents, sample_image):
    question = "is there a red circle at the top left " * 150 + "?"
    said = {}
    for backend, agent in agents.items():
        with pytest.raises(ValueError) as e:
            agent.ask(sample_image, question, adapter="vqa")
        said[backend] = str(e.value)
    assert said["torch"] == said["edge"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("question", ["", "   \n\t "])
def test_an_empty_question_is_refused_where_a_question_is_needed(agents, backend, sample_image, question):
    agent = agents[backend]
    for adapter in ("vqa", None):
        with pytest.raises(ValueError, match="the question is empty; a `vqa` request needs a question"):
            agent.ask(sample_image, question, adapter=adapter)
    with pytest.raises(ValueError, match="the question is empty"):
        list(agent.stream(sample_image, question, adapter="vqa"))
    # a caption ignores the question
    assert agent.ask(sample_image, question, adapter="caption", max_new_tokens=2).adapter == "caption"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("image", [Image.new("RGB", (0, 0)), Image.new("RGB", (0, 7)), np.zeros((0, 0, 3), np.uint8)],
                         ids=["pil-0x0", "pil-0x7", "array-0x0"])
def test_an_image_without_pixels_is_refused(agents, backend, image):
    agent = agents[backend]
    with pytest.raises(ImageError, match=r"is empty \(.*\); pass an image with at least one pixel"):
        agent.ask(image, "is there a circle?")
    with pytest.raises(ImageError, match="is empty"):
        list(agent.stream(image, "is there a circle?"))
    if isinstance(image, Image.Image):  # a caller of the backend itself, past load_image
        with pytest.raises(ImageError, match=r"the image is empty \(0x\d+ pixels\)"):
            agent.backend.generate(image, "is there a circle?", "vqa", "vqa", (), 2, None)
