"""Native crashes (issue: llama.cpp's AMX kernels segfault on Intel CPUs) never kill the caller silently."""
from __future__ import annotations

import ctypes
import faulthandler
import json

import pytest

import mmagent.isolate as isolate
from mmagent.backends import llama_cpp as lc
from mmagent.isolate import NativeCrash, run_isolated


def test_a_segfault_in_the_child_names_the_stage_the_file_and_the_signal():
    with pytest.raises(NativeCrash, match=r"quantising to q8_0 crashed \(SIGSEGV\) on `llm.f16.gguf`\. look here"):
        run_isolated("quantising to q8_0", "llm.f16.gguf", ctypes.string_at, 0, hint="look here")


def test_results_and_python_errors_come_back_as_themselves():
    assert run_isolated("adding", "-", divmod, 7, 2) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        run_isolated("dividing", "-", divmod, 1, 0)


def test_the_batched_quantised_decode_of_this_build_does_not_crash():
    """The crash itself, reproduced where the CPU has AMX: a batch of 8 rows through Q8_0 weights with
    llama.cpp's extra buffer types on. A miscompiled build (see sdk/backends/llama_cpp.py) dies here."""
    assert run_isolated("batched Q8_0 decode, extra buffer types on", "probe model",
                        lc.probe_batched_decode, True)
    assert run_isolated("batched Q8_0 decode, extra buffer types off", "probe model",
                        lc.probe_batched_decode, False)


@pytest.fixture
def fresh_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("MMAGENT_CACHE", str(tmp_path))
    monkeypatch.delenv("MMAGENT_LLAMA_EXTRA_BUFTS", raising=False)
    monkeypatch.setattr(lc, "system_info", lambda: "CPU : AVX512 = 1 | AMX_INT8 = 1 |")
    lc._probe_verdict.cache_clear()
    yield tmp_path
    lc._probe_verdict.cache_clear()


def test_a_crashing_probe_turns_the_extra_buffer_types_off_once_and_remembers(fresh_probe, monkeypatch, caplog):
    calls = []

    def crashing(stage, file, fn, *args, **kw):
        calls.append(fn)
        return run_isolated(stage, file, faulthandler._sigsegv, **kw)
    monkeypatch.setattr(isolate, "run_isolated", crashing)
    assert lc.extra_buffer_types_usable() is False
    assert "AMX kernels crash" in caplog.text
    [verdict] = (fresh_probe / "llama-cpp-probe").glob("*.json")
    assert json.loads(verdict.read_text())["extra_buffer_types"] is False
    lc._probe_verdict.cache_clear()
    assert lc.extra_buffer_types_usable() is False and len(calls) == 1  # the cached verdict, no second probe


def test_a_passing_probe_keeps_the_fast_paths(fresh_probe):
    assert lc.extra_buffer_types_usable() is True  # this suite's own build must pass the real probe


def test_the_environment_overrides_the_probe(fresh_probe, monkeypatch):
    monkeypatch.setattr(isolate, "run_isolated", lambda *a, **k: pytest.fail("probed despite the override"))
    monkeypatch.setenv("MMAGENT_LLAMA_EXTRA_BUFTS", "0")
    assert lc.extra_buffer_types_usable() is False
    monkeypatch.setenv("MMAGENT_LLAMA_EXTRA_BUFTS", "1")
    assert lc.extra_buffer_types_usable() is True


def test_no_probe_where_the_build_has_no_amx_kernels(fresh_probe, monkeypatch):
    monkeypatch.setattr(lc, "system_info", lambda: "CPU : AVX2 = 1 | FMA = 1 |")
    monkeypatch.setattr(isolate, "run_isolated", lambda *a, **k: pytest.fail("probed without AMX"))
    assert lc.extra_buffer_types_usable() is True
