"""Fewer, larger kernels for the LLM's elementwise work in training (recipe `train.fused_ops`).

Why: at B16·T544 on the 7B shape the matrix products take about 330 ms of a 630 ms GPU step; most of the
rest is transformers' eager RMSNorm (a float32 copy, pow, mean, rsqrt, two multiplies and a cast back, each
a pass over the activations, and as many again backward) and the rotary embedding (rotate_half's slice, neg
and cat, then two multiplies and an add, for q and for k) - bench/profile_7b.py, docs/BENCHMARKS.md.
- RMSNorm: torch's own fused kernel (F.rms_norm), one pass forward and backward, float32 inside as
  transformers computes it.
- Rotary embedding: transformers' own function, compiled once by torch.compile into one kernel forward and
  one backward (CUDA only; a failure to compile falls back to the eager function).
- SwiGLU: the MLP's SiLU(gate)·up, eagerly a SiLU pass and a multiply pass over the (tokens x 11,008)
  activations and three more backward, compiled into one kernel each way (CUDA; eager elsewhere).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Give every RMSNorm module (LLaMA's, by its `variance_epsilon`) a forward through F.rms_norm; the
    number changed. Where input and weight dtypes differ (fp32 weights under autocast), the module's own
    forward runs, since its dtype promotion is what the rest of the model expects."""
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") \
                and getattr(module, "weight", None) is not None and not hasattr(module, "_mm_eager_forward"):
            module._mm_eager_forward = module.forward
            module.forward = _fused_forward(module)
            n += 1
    return n


def _fused_forward(module):
    eager = module._mm_eager_forward

    def forward(hidden_states):
        if hidden_states.dtype != module.weight.dtype:
            return eager(hidden_states)
        with torch.autocast(hidden_states.device.type, enabled=False):  # autocast would cast to float32
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), module.weight, module.variance_epsilon)
    return forward


def fuse_rotary(model: torch.nn.Module) -> list[str]:
    """Compile the rotary-embedding function of each transformers module the model's layers come from
    (LLaMA for Vicuna and LLaVA-1.5); the modules patched."""
    import sys
    if not torch.cuda.is_available():
        return []
    patched = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        mod = sys.modules.get(name)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if fn is None or getattr(fn, "_mm_fused", False):
            continue
        setattr(mod, "apply_rotary_pos_emb", _compiled(fn))
        patched.append(name)
    return patched


def _compiled(fn):
    compiled = torch.compile(fn, fullgraph=True)
    state = {"ok": True}

    def rotary(*args, **kwargs):
        if state["ok"]:
            try:
                return compiled(*args, **kwargs)
            except Exception:  # noqa: BLE001 - a compiler problem must not stop training: eager is exact
                state["ok"] = False
        return fn(*args, **kwargs)
    rotary._mm_fused = True
    rotary.__wrapped__ = fn
    return rotary


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def fuse_swiglu(model: torch.nn.Module) -> int:
    """Give every LLaMA-style MLP (gate_proj, up_proj, down_proj, a SiLU activation) a forward whose
    SiLU(gate)·up is one compiled function; the number changed."""
    silu_mul = _compiled(_silu_mul) if torch.cuda.is_available() else _silu_mul
    n = 0
    for module in model.modules():
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) \
                and getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish") \
                and not hasattr(module, "_mm_eager_forward"):
            module._mm_eager_forward = module.forward
            module.forward = _swiglu_forward(module, silu_mul)
            n += 1
    return n


def _swiglu_forward(module, silu_mul):
    def forward(x):
        return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))
    return forward
