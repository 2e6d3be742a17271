"""`mmagent chat` driven through a real pseudo-terminal, as a person would type into it."""
import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

MMAGENT = shutil.which("mmagent", path=str(Path(sys.executable).parent)) or "mmagent"
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[=>])")  # colours, cursor, modes


class Terminal:
    """A child process on a pty: `send` types a line, `expect` waits (bounded) for a regex in its output."""

    def __init__(self, argv: list[str], cols: int = 200):
        master, slave = pty.openpty()
        # wide, so rich never wraps a line the regexes look at
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, cols, 0, 0))

        def child_setup():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty becomes the controlling terminal, as in a shell
            # llama.cpp spin-waits between its threads; on this shared 2-core machine one busy core makes a
            # 2-thread generation ~40x slower, so give the child one CPU (-> one llama.cpp thread)
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=child_setup,
                                     env={**os.environ, "TERM": "xterm-256color"})
        os.close(slave)
        self.fd, self.raw, self.pos = master, b"", 0

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace")).replace("\r", "")

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while not (m := regex.search(self.text, self.pos)):
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"no {pattern!r} within {timeout} s; the terminal shows:\n{self.text[self.pos:]}")
        self.pos = m.end()
        return m

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.raw += data
        return bool(data)

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def prompt(self) -> None:
        self.expect(r"you> ")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def terminal():
    opened = []

    def open_(*args):
        opened.append(Terminal([MMAGENT, "chat", *map(str, args)]))
        return opened[-1]
    yield open_
    for t in opened:
        t.close()


def turn(term: Terminal, question: str) -> tuple[str, str, str]:
    """Type a question; (streamed answer, adapter, reason) from the terminal."""
    term.send(question)
    m = term.expect(r"model> (.*?)\n\((\w+): ([^\n]*)\)\n")
    term.prompt()
    return m.group(1).strip(), m.group(2), m.group(3)


def test_terminal_chat_session(terminal, bundle, sample_image, tmp_path):
    from mmagent import Agent
    agent = Agent.load(bundle, n_threads=1)  # the reference answers, computed the same way as the child's
    term = terminal(sample_image, "--model", bundle)
    term.expect(r"adapters: vqa, caption\. /help for commands")
    term.prompt()

    # the streamed text is the whole answer (greedy, so the same as asking directly) and the router says why
    answer, adapter, reason = turn(term, "is there a circle?")
    assert answer == agent.ask(sample_image, "is there a circle?").text
    assert adapter == "vqa" and "is a question" in reason

    term.send("/adapters")
    for name in ("vqa", "caption"):
        info = agent.adapter_info(name)
        term.expect(rf"  {name}: {', '.join(info.kinds)} \(adapts {', '.join(info.parts)}\)\n")
    term.prompt()

    # a bad command argument is an error line, not the end of the session
    term.send("/adapter nope")
    term.expect(r"error: no adapter `nope`; choose one of: auto, vqa, caption")
    term.prompt()
    _, adapter, reason = turn(term, "Describe the picture.")
    assert adapter == "caption" and reason.startswith("the instruction asks for a description")

    term.send("/adapter caption")
    term.expect(r"adapter: caption\n")
    term.prompt()
    assert turn(term, "is there a circle?")[1:] == ("caption", "chosen by the caller")

    term.send("/image /no/such.png")
    term.expect(r"error: image `/no/such\.png` does not exist")
    term.prompt()
    assert turn(term, "how many squares?")[1] == "caption"  # the old image and the chosen adapter stay

    saved = tmp_path / "chat.json"
    term.send(f"/save {saved}")
    term.expect(r"saved to .*chat\.json\n")
    term.prompt()
    data = json.loads(saved.read_text())
    assert data["image"] == str(sample_image) and data["adapter"] == "caption"
    assert [t["user"] for t in data["turns"]] == ["is there a circle?", "Describe the picture.",
                                                  "is there a circle?", "how many squares?"]
    assert data["turns"][0]["assistant"] == answer

    term.send("/reset")
    term.expect(r"conversation reset\n")
    term.prompt()
    term.send(f"/save {tmp_path / 'after.json'}")
    term.prompt()
    assert json.loads((tmp_path / "after.json").read_text())["turns"] == []

    term.send("/quit")
    assert term.proc.wait(timeout=30) == 0


def test_ctrl_d_leaves_cleanly(terminal, bundle, sample_image):
    term = terminal(sample_image, "--model", bundle, "--adapter", "caption")
    term.prompt()
    os.write(term.fd, b"\x04")  # end of input at an empty prompt
    assert term.proc.wait(timeout=30) == 0


@pytest.mark.parametrize("args, message", [
    (["--adapter", "nope"], "no adapter `nope`; this model has: vqa, caption"),
    (["--backend", "onnx"], "backend must be auto, torch or edge"),
])
def test_bad_options_exit_2_with_the_reason(bundle, sample_image, args, message):
    proc = subprocess.run([MMAGENT, "chat", str(sample_image), "--model", str(bundle), *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and message in " ".join(proc.stderr.split())


def test_missing_image_exits_2(bundle, tmp_path):
    proc = subprocess.run([MMAGENT, "chat", str(tmp_path / "nope.png"), "--model", str(bundle)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "nope.png` does not exist" in " ".join(proc.stderr.split())


class FakeAgent:
    """Answers with text that looks like rich markup, as any model may produce."""
    adapters = ["vqa"]

    def ask(self, image, question, adapter=None, history=(), on_text=None, **kw):
        from mmagent import Answer
        for piece in ("use ", "[/]", " or ", "[bold]x[/bold]"):
            on_text(piece)
        return Answer("use [/] or [bold]x[/bold]", "vqa", "chosen")


def test_model_text_is_printed_verbatim(sample_image):
    from rich.console import Console
    from mmagent.chat import run_terminal_chat
    out = io.StringIO()
    typed = iter(["what is it?"])

    def read_once(prompt):  # one line, then end of input
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    run_terminal_chat(FakeAgent(), sample_image, None, Console(file=out, width=200), read=read_once)
    assert "model> use [/] or [bold]x[/bold]" in out.getvalue()
