"""ONNX image path of BLIP-2: one graph, task adapters as onnxruntime adapter files, checked against torch+PEFT."""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import torch

peft = pytest.importorskip("peft")
from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig  # noqa: E402

from mmagent.backends.onnx_vision import VisionSession  # noqa: E402
from mmagent.export.onnx.vision import (  # noqa: E402
    export_vision, lora_input_names, lora_inputs, optimize, write_adapter,
)

# PEFT warns that names "a"/"b" occur in "lora_"; that matters only when reloading by prefix, not here
pytestmark = pytest.mark.filterwarnings("ignore:Adapter name:UserWarning")

QFORMER_QV = r"qformer\.encoder\.layer\.\d+\.(attention|crossattention)\.attention\.(query|value)"
RANK, ALPHA = 4, 8


def tiny_blip2() -> Blip2ForConditionalGeneration:
    torch.manual_seed(0)
    config = Blip2Config(
        # the vision default initializer_range is 1e-10: activations ~0 would hide errors and vanish in fp16
        vision_config=dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, initializer_range=0.02),
        qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            encoder_hidden_size=64, cross_attention_frequency=1),
        text_config=LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                intermediate_size=128, vocab_size=1000).to_dict(),
        num_query_tokens=4)
    model = Blip2ForConditionalGeneration(config).eval()
    torch.nn.init.normal_(model.query_tokens, std=0.02)  # initialised to zeros; random queries are a harder test
    return model


def with_lora(model, adapters: dict[str, int], targets: str = QFORMER_QV, seed: int = 1):
    """A PEFT copy of `model` with one LoRA per {name: rank}, lora_B random so each adapter changes the output."""
    peft_model = None
    for name, rank in adapters.items():
        config = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=targets)
        if peft_model is None:
            peft_model = peft.get_peft_model(copy.deepcopy(model), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    torch.manual_seed(seed)
    for module in peft_model.modules():
        if hasattr(module, "lora_B"):
            for b in module.lora_B.values():
                torch.nn.init.normal_(b.weight, std=0.1)
    return peft_model.eval()


def peft_tensors(peft_model, name: str) -> dict:
    return peft.get_peft_model_state_dict(peft_model, adapter_name=name)


def torch_embeds(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.get_image_features(pixel_values=torch.from_numpy(pixels), return_dict=True).pooler_output.numpy()


def adapted_embeds(peft_model, name: str, pixels: np.ndarray) -> np.ndarray:
    peft_model.set_adapter(name)
    return torch_embeds(peft_model.get_base_model(), pixels)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def base():
    return tiny_blip2()


@pytest.fixture(scope="module")
def peft_ab(base):
    return with_lora(base, {"a": RANK, "b": RANK})


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, base, peft_ab):
    """The exported graph plus adapter files `a` and `b`."""
    out = tmp_path_factory.mktemp("onnx")
    export_vision(base, out / "vision.onnx", RANK, [QFORMER_QV])
    for name in ("a", "b"):
        write_adapter(peft_tensors(peft_ab, name), ALPHA, RANK, out / f"{name}.onnx_adapter",
                      onnx_path=out / "vision.onnx")
    return out


def session(path, bundle) -> VisionSession:
    s = VisionSession(path, providers=["CPUExecutionProvider"])
    for name in ("a", "b"):
        s.load_adapter(name, bundle / f"{name}.onnx_adapter")
    return s


@pytest.fixture(scope="module")
def vision(bundle):
    return session(bundle / "vision.onnx", bundle)


@pytest.fixture(scope="module")
def optimized(bundle):
    fused = optimize(bundle / "vision.onnx", bundle / "vision.opt.onnx", bundle / "vision.fp16.onnx")
    return fused, session(bundle / "vision.opt.onnx", bundle), session(bundle / "vision.fp16.onnx", bundle)


def test_export_leaves_model_unchanged_and_names_lora_inputs(base, bundle):
    assert all(type(m) is torch.nn.Linear for n, m in base.named_modules() if n.endswith((".query", ".value")))
    graph = onnx.load(bundle / "vision.onnx").graph
    assert [i.name for i in graph.input][0] == "pixel_values" and [o.name for o in graph.output] == ["image_embeds"]
    shapes = lora_inputs(bundle / "vision.onnx")
    a, b = lora_input_names("qformer.encoder.layer.1.crossattention.attention.value")
    assert shapes[a] == (RANK, 64) and shapes[b] == (64, RANK)
    assert len(shapes) == 2 * 2 * 2 * 2  # layers x (self, cross) x (query, value) x (A, B)
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name in shapes}
    assert set(defaults) == set(shapes) and not any(v.any() for v in defaults.values())


def test_base_matches_torch(vision, base, pixels):
    assert max_diff(vision.run(pixels, None), torch_embeds(base, pixels)) < 1e-4


def test_adapter_matches_torch(vision, base, peft_ab, pixels):
    expected = adapted_embeds(peft_ab, "a", pixels)
    assert max_diff(expected, torch_embeds(base, pixels)) > 1e-2  # the adapter really changes the output
    assert max_diff(vision.run(pixels, "a"), expected) < 1e-4


def test_switching_adapters(vision, base, peft_ab, pixels):
    expected = {"a": adapted_embeds(peft_ab, "a", pixels), "b": adapted_embeds(peft_ab, "b", pixels),
                None: torch_embeds(base, pixels)}
    assert max_diff(expected["a"], expected["b"]) > 1e-2
    for name in ("a", "b", "a", None, "b", None):
        assert max_diff(vision.run(pixels, name), expected[name]) < 1e-4, name


def test_concurrent_runs_keep_their_adapter(vision, base, peft_ab, pixels):
    expected = {"a": adapted_embeds(peft_ab, "a", pixels), "b": adapted_embeds(peft_ab, "b", pixels),
                None: torch_embeds(base, pixels)}
    order = ["a", "b", None] * 8
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda name: vision.run(pixels, name), order))
    for name, got in zip(order, results):
        assert max_diff(got, expected[name]) < 1e-4, name


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch(vision, base, peft_ab, batch):
    pixels = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    assert vision.run(pixels, None).shape == (batch, 4, 64)
    assert max_diff(vision.run(pixels, None), torch_embeds(base, pixels)) < 1e-4
    assert max_diff(vision.run(pixels, "a"), adapted_embeds(peft_ab, "a", pixels)) < 1e-4


def test_optimized_graph_same_outputs(optimized, bundle, base, peft_ab, pixels):
    fused, opt, _ = optimized
    # Attention does not fuse (ViT's packed qkv, Q-Former's masked/LoRA'd projections); the norms and GELU do.
    assert {"SkipLayerNormalization", "LayerNormalization", "BiasGelu"} <= set(fused), fused
    assert lora_inputs(bundle / "vision.opt.onnx") == lora_inputs(bundle / "vision.onnx")
    assert max_diff(opt.run(pixels, None), torch_embeds(base, pixels)) < 1e-4
    for name in ("a", "b"):
        assert max_diff(opt.run(pixels, name), adapted_embeds(peft_ab, name, pixels)) < 1e-4


def test_fp16_variant_close(optimized, bundle, base, peft_ab, pixels):
    _, _, half = optimized
    graph = onnx.load(bundle / "vision.fp16.onnx").graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # io kept float32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    assert max_diff(half.run(pixels, None), torch_embeds(base, pixels)) < 1e-2
    assert max_diff(half.run(pixels, "a"), adapted_embeds(peft_ab, "a", pixels)) < 1e-2


def test_smaller_rank_adapter_is_padded(bundle, base, vision, pixels, tmp_path):
    small = with_lora(base, {"small": 2}, seed=2)
    write_adapter(peft_tensors(small, "small"), ALPHA, 2, tmp_path / "small.onnx_adapter",
                  onnx_path=bundle / "vision.onnx")
    vision.load_adapter("small", tmp_path / "small.onnx_adapter")
    assert max_diff(vision.run(pixels, "small"), adapted_embeds(small, "small", pixels)) < 1e-4


def test_adapter_on_module_outside_graph_refused(bundle, base, tmp_path):
    with_key = with_lora(base, {"k": RANK}, targets=r"qformer\.encoder\.layer\.\d+\.attention\.attention\.(query|key)")
    with pytest.raises(ValueError, match=r"qformer\.encoder\.layer\.0\.attention\.attention\.key.*no input"):
        write_adapter(peft_tensors(with_key, "k"), ALPHA, RANK, tmp_path / "k.onnx_adapter",
                      onnx_path=bundle / "vision.onnx")
    assert not (tmp_path / "k.onnx_adapter").exists()


def test_larger_rank_and_non_lora_tensors_refused(bundle, base, peft_ab, tmp_path):
    big = with_lora(base, {"big": 2 * RANK})
    with pytest.raises(ValueError, match="re-export with lora_rank >= 8"):
        write_adapter(peft_tensors(big, "big"), ALPHA, 2 * RANK, tmp_path / "big.onnx_adapter",
                      onnx_path=bundle / "vision.onnx")
    magnitude = {**peft_tensors(peft_ab, "a"),
                 "base_model.model.qformer.encoder.layer.0.attention.attention.query.lora_magnitude_vector":
                     torch.ones(64)}
    with pytest.raises(ValueError, match="lora_magnitude_vector.*not a LoRA A/B weight"):
        write_adapter(magnitude, ALPHA, RANK, tmp_path / "m.onnx_adapter", onnx_path=bundle / "vision.onnx")


def test_external_data_when_over_protobuf_limit(monkeypatch, base, peft_ab, pixels, tmp_path):
    from mmagent.export.onnx import vision as module
    monkeypatch.setattr(module, "_PROTO_LIMIT", 0)  # as if the weights were over 2 GB
    export_vision(base, tmp_path / "vision.onnx", RANK, [QFORMER_QV])
    optimize(tmp_path / "vision.onnx", tmp_path / "vision.opt.onnx")
    assert (tmp_path / "vision.onnx.data").exists() and (tmp_path / "vision.opt.onnx.data").exists()
    write_adapter(peft_tensors(peft_ab, "a"), ALPHA, RANK, tmp_path / "a.onnx_adapter",
                  onnx_path=tmp_path / "vision.onnx")
    for graph in ("vision.onnx", "vision.opt.onnx"):
        s = VisionSession(tmp_path / graph, providers=["CPUExecutionProvider"])
        s.load_adapter("a", tmp_path / "a.onnx_adapter")
        assert max_diff(s.run(pixels, None), torch_embeds(base, pixels)) < 1e-4
        assert max_diff(s.run(pixels, "a"), adapted_embeds(peft_ab, "a", pixels)) < 1e-4
