import pytest

from mmagent.router import classify, route

ADAPTERS = {"caption": ["caption"], "vqa": ["vqa"]}


@pytest.mark.parametrize("text,kind", [("Describe the picture.", "caption"), ("Write a caption", "caption"),
                                       ("What is in this image", "caption"), ("What colour is the circle?", "vqa"),
                                       ("how many squares", "vqa"), ("Is there a triangle", "vqa"),
                                       ("the thing on the left?", "vqa")])
def test_classify(text, kind):
    assert classify(text)[0] == kind


def test_route_explains_and_can_be_overridden():
    r = route("Describe it", ADAPTERS)
    assert r.adapter == "caption" and "description" in r.reason
    r = route("Describe it", ADAPTERS, override="vqa")
    assert r.adapter == "vqa" and r.reason == "chosen by the caller"
    with pytest.raises(KeyError, match="no adapter `ocr`; this model has: caption, vqa"):
        route("x", ADAPTERS, override="ocr")


def test_multitask_adapter_serves_both_kinds_and_missing_kind_falls_back():
    both = {"multitask": ["caption", "vqa"]}
    assert route("Describe it", both).adapter == "multitask" and route("Describe it", both).kind == "caption"
    r = route("Describe it", {"vqa": ["vqa"]})
    assert r.adapter == "vqa" and "no adapter serves caption" in r.reason
    assert route("hi?", {}).adapter is None
