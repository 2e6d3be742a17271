"""device="cuda": the choice, and the refusals where the CUDA build or provider is missing (never a quiet CPU run).

The GPU paths themselves run in bench/gpu_kernels.sh on a lent GPU (docs/BENCHMARKS.md); here their logic
runs on the CPU, and the tests that need CUDA skip without it."""
from __future__ import annotations

import pytest
import torch

from mmagent.device import (DeviceError, check_onnx_session, llama_cuda_problem, onnx_providers, parse_device,
                            require_llama_cuda)

CUDA = torch.cuda.is_available()


def test_device_names():
    assert parse_device(None) == "cpu" and parse_device(None, default="cuda") == "cuda"
    assert parse_device("CUDA") == "cuda" and parse_device("cuda:1") == "cuda:1" and parse_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ValueError, match="cpu` or `cuda"):
            parse_device(bad)


def test_llama_cpp_without_a_gpu_backend_names_the_build_to_install():
    assert llama_cuda_problem(True, "CUDA : ARCHS = 900 |") is None
    cpu_only = llama_cuda_problem(False, "CPU : SSE3 = 1 | AVX2 = 1 |")
    assert "GGML_CUDA" in cpu_only and "llama-cpp-python" in cpu_only and "LLAMA_CPP_LIB_PATH" in cpu_only
    no_gpu = llama_cuda_problem(False, "CUDA : ARCHS = 900 | CPU : AVX2 = 1 |")
    assert "sees no CUDA GPU" in no_gpu and "CUDA_VISIBLE_DEVICES" in no_gpu


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_this_llama_cpp_build_is_refused_for_cuda():
    import llama_cpp
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build offloads to a GPU")
    with pytest.raises(DeviceError, match="llama-cpp-python"):
        require_llama_cuda()


def test_onnxruntime_providers_for_each_device():
    assert onnx_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert onnx_providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == \
        [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    with pytest.raises(DeviceError, match="onnxruntime-gpu"):
        onnx_providers("cuda", ["CPUExecutionProvider"])


def test_a_cuda_session_that_fell_back_to_the_cpu_is_refused():
    check_onnx_session(["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda")
    check_onnx_session(["CPUExecutionProvider"], "cpu")
    with pytest.raises(DeviceError, match="could not\\s+start it"):
        check_onnx_session(["CPUExecutionProvider"], "cuda")


def test_the_vision_graph_runs_on_the_cpu_unless_cuda_is_asked(tmp_path):
    """onnxruntime-gpu lists CUDA among its providers; a session nobody asked to put on a GPU stays on the CPU,
    and its idle threads do not spin on the cores llama.cpp decodes on."""
    import onnx
    from onnx import TensorProto, helper

    from mmagent.backends.onnx_vision import VisionSession
    graph = helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["image_embeds"])], "g",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "v.onnx")
    session = VisionSession(tmp_path / "v.onnx").session
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_torch_placement():
    from mmagent.backends.torch import torch_placement
    assert torch_placement("cpu", None) == (torch.device("cpu"), torch.float32)
    assert torch_placement("cpu", torch.bfloat16)[1] == torch.bfloat16
    if CUDA:
        assert torch_placement("cuda", None) == (torch.device("cuda"), torch.bfloat16)
    else:
        assert torch_placement(None, None) == (torch.device("cpu"), torch.float32)
        with pytest.raises(DeviceError, match="CUDA build\\s+of PyTorch"):
            torch_placement("cuda", None)


def test_quantisation_types_are_llama_cpp_s():
    import llama_cpp
    from mmagent.export.gguf.writer import QUANT_FTYPES
    assert QUANT_FTYPES == {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_agent_and_cli_refuse_cuda_they_cannot_give(bundle, two_runs, sample_image):
    import llama_cpp
    from typer.testing import CliRunner

    from mmagent import Agent
    from mmagent.cli import app
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build offloads to a GPU")
    with pytest.raises(DeviceError, match="llama-cpp-python"):
        Agent.load(bundle, device="cuda")
    with pytest.raises(DeviceError, match="PyTorch"):
        Agent.load(two_runs, device="cuda")
    result = CliRunner().invoke(app, ["chat", str(sample_image), "--model", str(bundle), "--device", "cuda"])
    assert result.exit_code == 2 and "llama-cpp-python" in result.output
    result = CliRunner().invoke(app, ["serve", str(bundle), "--device", "tpu"])
    assert result.exit_code == 2 and "`cpu` or `cuda`" in result.output


def test_static_cache_steps_match_a_full_forward():
    """The GPU decode path's pieces, run eagerly: prefill into the static cache, then each step's logits
    (4-D mask, explicit positions) equal a no-cache forward over the whole sequence; a decode step writes
    the argmax as the next input and moves the position on."""
    from mmagent.train.builtin import init_base
    from mmagent.train.graph_decode import GraphDecoder
    from mmagent.train.vlm import VLM
    vlm = VLM(*init_base("tiny"))
    decoder, embed = GraphDecoder(vlm, use_graphs=False), vlm.family.embed_tokens(vlm.base_model)
    head, lm = vlm.family.head(vlm.base_model), vlm.family.decoder(vlm.base_model)
    torch.manual_seed(0)
    seq = torch.randint(0, 4000, (1, 9))
    with torch.no_grad():
        step = decoder._step_for(256, torch.device("cpu"))
        step.cache.reset()
        hidden = decoder._forward(step, embed(seq[:, :6]), torch.arange(6))
        for n in range(6, 9):  # feed chosen tokens (an untrained model's argmax repeats itself)
            full = head(lm(inputs_embeds=embed(seq[:, :n])).last_hidden_state[:, -1])
            torch.testing.assert_close(head(hidden[:, -1]), full, rtol=1e-4, atol=1e-4)
            if n < 8:
                hidden = decoder._forward(step, embed(seq[:, n:n + 1]), torch.tensor([n]))
        step.token.fill_(int(seq[0, 8]))
        step.pos.fill_(8)
        decoder._decode_step(step)
        full = head(lm(inputs_embeds=embed(seq)).last_hidden_state[:, -1])
    assert int(step.token) == int(full.argmax()) and int(step.pos) == 9


@pytest.mark.slow
def test_compiled_decode_steps_write_what_eager_steps_write():
    """MMAGENT_TORCH_COMPILE: the step traced by torch.compile (aot_eager here; inductor on the GPU) keeps its
    in-place effects (next token, position, every layer's KV cache row), which a graph replay depends on;
    an unknown mode is refused by name."""
    from mmagent.train.builtin import init_base
    from mmagent.train.graph_decode import GraphDecoder
    from mmagent.train.vlm import VLM
    vlm = VLM(*init_base("tiny"))
    with pytest.raises(ValueError, match="MMAGENT_TORCH_COMPILE"):
        GraphDecoder(vlm, compile_mode="fastest")
    torch.manual_seed(0)
    embeds = vlm.family.embed_tokens(vlm.base_model)(torch.randint(0, 4000, (1, 7)))
    runs = []
    for mode in (None, "aot_eager"):
        decoder = GraphDecoder(vlm, use_graphs=False, compile_mode=mode)
        tokens = decoder.generate(embeds, 6, stop_at_eos=False)
        (step,) = decoder.steps.values()
        assert (decoder._compiled is not None) == bool(mode)  # the decode steps went through torch.compile
        kv = [t.clone() for layer in step.cache.layers for t in (layer.keys, layer.values)]
        runs.append((tokens, int(step.pos), kv))
    (eager_tokens, eager_pos, eager_cache), (tokens, pos, cache) = runs
    assert tokens == eager_tokens and pos == eager_pos == 7 + 5
    for got, want in zip(cache, eager_cache, strict=True):
        assert want[..., :pos, :].abs().sum() > 0  # rows were written...
        torch.testing.assert_close(got, want)  # ...and the compiled steps wrote the same ones


def _decode_cache(vlm, embeds, **kw):
    """Greedy tokens and every layer's KV cache rows after 6 decode steps of a GraphDecoder (eager steps)."""
    from mmagent.train.graph_decode import GraphDecoder
    decoder = GraphDecoder(vlm, use_graphs=False, **kw)
    tokens = decoder.generate(embeds, 6, stop_at_eos=False)
    (step,) = decoder.steps.values()
    return decoder, tokens, [t[..., :int(step.pos), :].clone() for layer in step.cache.layers
                             for t in (layer.keys, layer.values)]


@pytest.mark.slow
def test_fused_projections_decode_as_the_separate_ones_with_a_lora_active():
    """q|k|v and gate|up as one product each (ProjectionGroup): the same KV rows and tokens as the separate
    Linear layers, eagerly and through torch.compile, with a q/v LoRA adding its terms; the weights become
    views into one tensor (no copy), and a call order other than the fused one is refused, not sliced."""
    from peft import LoraConfig, get_peft_model
    from mmagent.train.builtin import init_base
    from mmagent.train.graph_decode import FusedOrderError, ProjectionGroup
    from mmagent.train.vlm import VLM
    torch.manual_seed(0)
    model, tok, proc = init_base("tiny")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a LoRA that changes q and v
    vlm = VLM(model, tok, proc)
    embeds = vlm.family.embed_tokens(vlm.base_model)(torch.randint(0, 4000, (1, 7)))
    _, want_tokens, want_cache = _decode_cache(vlm, embeds, fuse=False)
    for mode in (None, "aot_eager"):
        decoder, tokens, cache = _decode_cache(vlm, embeds, fuse=True, compile_mode=mode)
        layers = len(vlm.family.decoder(vlm.base_model).layers)
        assert len(decoder.groups) == 2 * layers and tokens == want_tokens
        for got, want in zip(cache, want_cache, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    attn = vlm.family.decoder(vlm.base_model).layers[0].self_attn
    q, k = attn.q_proj.get_base_layer(), attn.k_proj
    assert q.weight.untyped_storage().data_ptr() == k.weight.untyped_storage().data_ptr()  # one tensor
    group = decoder.groups[0]
    group.enter()
    try:
        x = torch.randn(1, 1, q.in_features)
        with pytest.raises(FusedOrderError):
            q(x), k(x.clone())
    finally:
        group.exit()
    assert isinstance(group, ProjectionGroup) and "forward" not in q.__dict__  # plain Linear layers again


@pytest.mark.slow
def test_a_model_calling_its_projections_in_another_order_decodes_unfused(monkeypatch, caplog):
    """A layer whose projections run in another order than LLaMA's would slice a wrong product: the first
    step notices (before any token is handed out), and the decode goes on unfused, with a warning."""
    from mmagent.train.builtin import init_base
    from mmagent.train.graph_decode import ProjectionGroup
    from mmagent.train.vlm import VLM
    torch.manual_seed(0)
    vlm = VLM(*init_base("tiny"))
    embeds = vlm.family.embed_tokens(vlm.base_model)(torch.randint(0, 4000, (1, 7)))
    _, want_tokens, want_cache = _decode_cache(vlm, embeds, fuse=False)
    monkeypatch.setattr(ProjectionGroup, "NAMES", (("self_attn", ("k_proj", "q_proj", "v_proj")),))
    decoder, tokens, cache = _decode_cache(vlm, embeds, fuse=True)
    assert tokens == want_tokens and not decoder.fuse and "another order" in caplog.text
    for got, want in zip(cache, want_cache, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_static_cache_steps_decode_as_the_dynamic_cache(two_runs, sample_image):
    """The GPU decode path's steps (static cache, 4-D masks, in-place token and position), run eagerly on
    the CPU, give the same greedy tokens as VLM.generate for every adapter, prompts of different lengths
    reusing one cache."""
    from PIL import Image

    from mmagent.backends.torch import TorchBackend
    from mmagent.train.graph_decode import GraphDecoder
    backend = TorchBackend(two_runs, device="cpu")
    image = Image.open(sample_image)
    cases = [(None, "caption", "Describe the image."), ("vqa", "vqa", "how many circles are there?"),
             ("caption", "caption", "Describe the image."), ("vqa", "vqa", "is there a red square on the left?")]

    def answers():
        return [backend.generate(image, q, a, k, (), 12, None, stop_at_eos=False)[0] for a, k, q in cases]

    reference = answers()
    decoder = backend.vlm.graph_decoder = GraphDecoder(backend.vlm, use_graphs=False)
    assert answers() == reference
    assert len(decoder.steps) == 3  # base, vqa, caption: one static cache each, reused across prompts
    stops = []
    backend.vlm.generate(backend.vlm.pixels([image]), [[1, 2, 3, *[backend.vlm.family.image_token_id(
        backend.vlm.base_model)] * backend.vlm.family.n_image_tokens(backend.vlm.base_model), 4]], 10,
        on_token=lambda step, ids: stops.append(step) or step == 2, stop_at_eos=False)
    assert stops == [0, 1, 2]  # on_token returning True ends decoding, as in VLM.generate


@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_backends_answer_as_on_the_cpu(bundle, two_runs, sample_image):  # pragma: no cover - GPU only
    from mmagent import Agent
    cpu, gpu = Agent.load(bundle), Agent.load(bundle, device="cuda")
    assert gpu.backend.vision.session.get_providers()[0] == "CUDAExecutionProvider"
    for adapter in [None, *cpu.adapters]:
        assert gpu.ask(sample_image, "how many circles?", adapter).tokens == \
            cpu.ask(sample_image, "how many circles?", adapter).tokens
    torch_gpu = Agent.load(two_runs, device="cuda")
    assert torch_gpu.backend.dtype == torch.bfloat16 and torch_gpu.ask(sample_image, "Describe it.").text


def test_llama_cpp_threads_follow_the_cores_the_lanes_and_the_device(monkeypatch, tmp_path):
    """On the CPU one thread per physical core (hyperthread siblings count once), shared by the lanes; with the
    layers on the GPU half the CPUs, as llama-cpp-python's Llama takes; MMAGENT_THREADS overrides all, and a
    bad value is named."""
    from mmagent.backends import llama_cpp as backend
    for cpu, core in ((0, 0), (1, 1), (2, 0), (3, 1), (4, 2)):  # 4 CPUs on 2 cores; cpu4 on a third
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert backend._physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert backend._physical_cores({0, 2}, tmp_path) == 1  # two siblings of one core
    assert backend._physical_cores({0, 1, 2, 3, 4, 7, 8}, tmp_path) == 5  # cpu7, cpu8: no topology, a core each
    monkeypatch.delenv("MMAGENT_THREADS", raising=False)
    monkeypatch.setattr(backend, "_usable_cpus", lambda: set(range(16)))
    monkeypatch.setattr(backend, "_physical_cores", lambda cpus: len(cpus) // 2)
    monkeypatch.setattr(backend, "_cpu_quota", lambda: None)  # whatever container runs this test
    assert backend.default_threads() == 8 and backend.default_threads(lanes=3) == 2
    assert backend.default_threads(lanes=32) == 1
    assert backend.default_threads(offloaded=True) == 8
    monkeypatch.setenv("MMAGENT_THREADS", "3")
    assert backend.default_threads(offloaded=True) == backend.default_threads(lanes=4) == 3
    monkeypatch.setenv("MMAGENT_THREADS", "many")
    with pytest.raises(ValueError, match="MMAGENT_THREADS"):
        backend.default_threads()


def test_llama_cpp_threads_stay_within_a_containers_cpu_quota(monkeypatch, tmp_path):
    """`docker --cpus=2.5` on a 16-core host: affinity shows 16 CPUs, the cgroup grants 2.5 CPUs' time, so 3
    threads; cgroup v2 and v1 files both read, "max" and -1 mean unlimited."""
    from mmagent.backends import llama_cpp as backend
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    v2.mkdir()
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert backend._cpu_quota(v2) == 3
    (v2 / "cpu.max").write_text("max 100000\n")
    assert backend._cpu_quota(v2) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert backend._cpu_quota(v1) == 2
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert backend._cpu_quota(v1) is None and backend._cpu_quota(tmp_path / "none") is None
    monkeypatch.delenv("MMAGENT_THREADS", raising=False)
    monkeypatch.setattr(backend, "_usable_cpus", lambda: set(range(16)))
    monkeypatch.setattr(backend, "_physical_cores", lambda cpus: 16)
    monkeypatch.setattr(backend, "_cpu_quota", lambda: 3)
    assert backend.default_threads() == 3 and backend.default_threads(offloaded=True) == 1
    assert backend.default_threads(lanes=2) == 1
    monkeypatch.setattr(backend, "_cpu_quota", lambda: None)
    assert backend.default_threads() == 16


def test_edge_lanes_share_the_cores(bundle, monkeypatch):
    from mmagent.backends import llama_cpp as backend
    from mmagent.backends.edge import EdgeBackend
    monkeypatch.delenv("MMAGENT_THREADS", raising=False)
    monkeypatch.setattr(backend, "_usable_cpus", lambda: set(range(8)))
    monkeypatch.setattr(backend, "_physical_cores", lambda cpus: 4)
    monkeypatch.setattr(backend, "_cpu_quota", lambda: None)
    edge = EdgeBackend(bundle, lanes=2)
    try:
        assert [lm.n_threads for lm in edge.lms] == [2, 2]
    finally:
        edge.close()


def test_llama_cpp_flash_attention_follows_the_device_unless_asked(monkeypatch, tmp_path):
    """Off with layers on a GPU, llama.cpp's auto on the CPU (what measured faster on each, docs/BENCHMARKS.md);
    the argument wins over MMAGENT_LLAMA_FLASH_ATTN, which wins over the device; a bad value is named with the
    accepted ones, before any model loads."""
    from mmagent.backends import llama_cpp as backend
    monkeypatch.delenv("MMAGENT_LLAMA_FLASH_ATTN", raising=False)
    assert backend.flash_attn_mode() == "auto" and backend.flash_attn_mode(offloaded=True) == "off"
    assert backend.flash_attn_mode("on", offloaded=True) == "on"
    path = tmp_path / "probe.gguf"
    backend.write_random_gguf(path)
    with backend.LlamaCppLM(path, n_ctx=32, n_threads=1) as lm:
        assert lm.flash_attn == "auto"
    monkeypatch.setenv("MMAGENT_LLAMA_FLASH_ATTN", "on")
    assert backend.flash_attn_mode(offloaded=True) == "on" and backend.flash_attn_mode("off") == "off"
    with backend.LlamaCppLM(path, n_ctx=32, n_threads=1) as lm:
        assert lm.flash_attn == "on" and lm.lane().flash_attn == "on"
    monkeypatch.setenv("MMAGENT_LLAMA_FLASH_ATTN", "yes")
    with pytest.raises(ValueError, match="MMAGENT_LLAMA_FLASH_ATTN='yes'.*on, off, auto"):
        backend.LlamaCppLM(path, n_ctx=32, n_threads=1)
