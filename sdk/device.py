"""Where a backend runs: `device="cpu"` or `"cuda"`, and a clear refusal when CUDA is asked for but missing.

Asking for CUDA never falls back to the CPU in silence: a llama.cpp build without CUDA, an onnxruntime
without its CUDA provider (or whose provider could not start), or a torch without CUDA is an error that
says what to install. Torch-free: the edge backend imports this.
"""
from __future__ import annotations

CPU, CUDA = "cpu", "cuda"
ORT_CUDA = "CUDAExecutionProvider"

LLAMA_CUDA_FIX = ("install llama-cpp-python built with CUDA: CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install "
                  "--force-reinstall --no-cache-dir --no-binary llama-cpp-python llama-cpp-python (needs the CUDA "
                  "toolkit's nvcc), or build llama.cpp's CUDA libraries with bench/gpu_build_llama.sh and point "
                  "LLAMA_CPP_LIB_PATH at them")
ORT_CUDA_FIX = ("install onnxruntime's CUDA build: pip uninstall onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]' "
                "(both install the module `onnxruntime`; `pip install mmagent[gpu]` names it)")


class DeviceError(ValueError):
    """CUDA was asked for and this install cannot give it; the message says what to install."""


def parse_device(device: str | None, default: str = CPU) -> str:
    """'cpu', 'cuda' or 'cuda:N' (torch); None means `default`."""
    if device is None:
        return default
    text = str(device).strip().lower()
    if text == CPU or text == CUDA or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise ValueError(f"device must be `cpu` or `cuda` (or `cuda:N`), got {device!r}")


def is_cuda(device: str) -> bool:
    return device.split(":")[0] == CUDA


# ---- llama.cpp ------------------------------------------------------------------------------------------------

def llama_cuda_problem(supports_offload: bool, system_info: str) -> str | None:
    """Why llama.cpp cannot put layers on a CUDA GPU here, or None when it can."""
    if supports_offload:
        return None
    if "CUDA" in system_info:
        return ("llama.cpp here is built with CUDA but sees no CUDA GPU (is one visible? check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES)")
    return f"the llama.cpp library llama-cpp-python loaded has no GPU backend (its features: {system_info.strip()}); " \
           + LLAMA_CUDA_FIX


def require_llama_cuda() -> None:
    import llama_cpp
    llama_cpp.llama_backend_init()  # registers the backends whose devices the check below counts
    problem = llama_cuda_problem(bool(llama_cpp.llama_supports_gpu_offload()),
                                 llama_cpp.llama_print_system_info().decode(errors="replace"))
    if problem:
        raise DeviceError(f"device='cuda' for the LLM: {problem}")


# ---- onnxruntime ----------------------------------------------------------------------------------------------

def onnx_providers(device: str, available: list[str]) -> list:
    """The providers for an onnxruntime session on `device`: CUDA first (CPU only for what CUDA lacks)."""
    if not is_cuda(device):
        return ["CPUExecutionProvider"]
    if ORT_CUDA not in available:
        raise DeviceError(f"device='cuda' for the vision graph: this onnxruntime has no CUDA provider (it has "
                          f"{', '.join(available)}); {ORT_CUDA_FIX}")
    index = int(device.split(":")[1]) if ":" in device else 0
    return [(ORT_CUDA, {"device_id": index}), "CPUExecutionProvider"]


def check_onnx_session(active: list[str], device: str) -> None:
    """onnxruntime drops to its CPU provider with only a log line when the CUDA one cannot start: refuse that."""
    if is_cuda(device) and ORT_CUDA not in active:
        raise DeviceError("device='cuda' for the vision graph: onnxruntime has a CUDA provider but could not "
                          f"start it (the session runs on {', '.join(active)}), usually because CUDA or cuDNN "
                          "libraries it needs were not found; install them with "
                          "pip install 'onnxruntime-gpu[cuda,cudnn]', or put the system's CUDA and cuDNN "
                          "libraries on LD_LIBRARY_PATH")


def preload_cuda_libraries() -> None:
    """Let onnxruntime find CUDA and cuDNN from NVIDIA's pip packages (a no-op where none are installed)."""
    import onnxruntime as ort
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - the session's own check below names what is missing
            pass


def vision_providers(device: str) -> list:
    """onnxruntime providers for the vision graph on `device`, CUDA's libraries preloaded where asked."""
    import onnxruntime as ort
    if is_cuda(device):
        preload_cuda_libraries()
    return onnx_providers(device, ort.get_available_providers())
