"""Run native code that may crash (llama.cpp, onnxruntime on freshly written files) in a child process.

A segfault in the child becomes a `NativeCrash` that names the stage, the file and the signal, instead of
killing the caller with no message. The child is a fresh interpreter (`python -m mmagent.isolate`), not
a fork: forking a process that holds torch's or OpenMP's threads can deadlock, and multiprocessing's
spawn would re-run the caller's script.

Arguments and results travel as pickles through a private temporary folder: both ends are this package.
"""
from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


class NativeCrash(RuntimeError):
    """The child running native code died from a signal."""


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _crash_lines(stderr: str, n: int = 6) -> list[str]:
    """The crash report's head (faulthandler's innermost frames), else the last lines the child wrote."""
    lines = stderr.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
    return lines[start:start + n] if start is not None else lines[-n:]


def run_isolated(stage: str, file, fn, *args, hint: str = "", timeout: float = 1800):
    """`fn(*args)` in a fresh Python process; its result, or its exception re-raised here.

    `stage` and `file` name what was running for the error message; `hint` adds the likely cause.
    """
    with tempfile.TemporaryDirectory(prefix="mmagent-isolate-") as tmp:
        request, reply = Path(tmp) / "request.pkl", Path(tmp) / "reply.pkl"
        request.write_bytes(pickle.dumps((fn.__module__, fn.__qualname__, args)))
        try:
            proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "mmagent.isolate", str(request),
                                   str(reply)], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise NativeCrash(f"{stage} did not finish within {timeout:.0f} s on `{file}`; {hint}".rstrip("; ")) from e
        if proc.returncode < 0 or not reply.exists():
            why = _signal_name(proc.returncode) if proc.returncode < 0 else f"exit status {proc.returncode}"
            tail = "\n    ".join(_crash_lines(proc.stderr))
            raise NativeCrash(f"{stage} crashed ({why}) on `{file}`. {hint}".rstrip()
                              + (f"\n  last output of the crashed process:\n    {tail}" if tail else ""))
        ok, value = pickle.loads(reply.read_bytes())
    if not ok:
        raise value
    return value


def _main(request: str, reply: str) -> None:
    module, name, args = pickle.loads(Path(request).read_bytes())
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    try:
        result = (True, fn(*args))
    except Exception as e:  # handed to the caller, who re-raises it
        result = (False, e)
    tmp = Path(reply + ".tmp")
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, reply)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
