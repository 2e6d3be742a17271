"""agent_examples/ run as a user runs them (a subprocess each), on the tiny trained runs and bundle.

The models are barely trained: the checks are on behaviour (exit status, adapter, routing, the JSONL
and the tool-call trace), never on what the answers say.
"""
import json
import os
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "agent_examples"


def one_cpu():
    # llama.cpp runs a thread per usable CPU and spin-waits between them: on this shared 2-core machine a
    # busy core made a 0.5 s batch take 25 s. One CPU, one thread.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def start(name: str, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, preexec_fn=one_cpu)


def run_example(name: str, *args, timeout: float = 180) -> str:
    """Run one example to completion; its stdout, after asserting it exited 0."""
    proc = start(name, *args, timeout=timeout)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def fields(out: str) -> dict:
    """'key:  value' lines of ask.py's output."""
    return {k.strip(): v.strip() for k, sep, v in (line.partition(":") for line in out.splitlines()) if sep}


def test_ask_routes_and_streams_on_bundle(bundle, sample_image):
    out = fields(run_example("ask.py", sample_image, "is there a circle?", "--model", bundle))
    assert out["adapter"] == "vqa" and "is a question" in out["reason"]
    # --stream prints the pieces first; they must join to the same (deterministic) answer
    streamed = run_example("ask.py", sample_image, "Describe the picture.", "--model", bundle, "--stream")
    first_line, rest = streamed.split("\n", 1)
    assert first_line.strip() == fields(rest)["answer"]
    assert fields(rest)["adapter"] == "caption" and "asks for a description" in fields(rest)["reason"]


def test_ask_on_a_run_directory_with_the_demo_picture(two_runs):
    # the torch backend, no image given (a drawn picture) and the default question
    out = fields(run_example("ask.py", "--model", two_runs[0]))
    assert out["adapter"] == "vqa" and "is a question" in out["reason"]


def test_ask_reports_a_bad_adapter_without_a_traceback(bundle):
    proc = start("ask.py", "--model", bundle, "--adapter", "nope")
    assert proc.returncode != 0 and "no adapter `nope`" in proc.stderr and "Traceback" not in proc.stderr


def test_batch_switch_uses_each_tasks_adapter(bundle, sample_image):
    out = run_example("batch_switch.py", sample_image, sample_image, "--model", bundle)
    jobs = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split("-> adapter ")[1].split()[0] for line in jobs] == ["caption", "vqa", "vqa"] * 2
    assert all(" s: " in line for line in jobs)  # per-job timing
    assert "total: 6 jobs in" in out and "3 adapter switches" in out


def write_scenes(folder: Path, n: int) -> list[str]:
    from mmagent.train.data.shapes import draw_scene, sample_scene
    rng = random.Random(1)
    names = []
    for i in range(n):
        name = f"{'sub/' if i == n - 1 else ''}scene{i}.png"  # one in a subfolder: the search is recursive
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        draw_scene(sample_scene(rng), 64).save(folder / name)
        names.append(name)
    return names


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption_folder_records_errors_and_resumes(bundle, tmp_path):
    folder = tmp_path / "photos"
    names = write_scenes(folder, 3)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image, not listed")
    out = folder / "captions.jsonl"

    first = run_example("caption_folder.py", folder, "--model", bundle)
    assert "captioned 3, errors 1" in first
    records = {r["path"]: r for r in read_jsonl(out)}
    assert set(records) == {*names, "broken.png"}
    assert "not a readable image" in records["broken.png"]["error"]
    assert all(records[n]["adapter"] == "caption" and isinstance(records[n]["caption"], str) for n in names)

    # nothing new: no model loaded, file untouched
    before = out.read_bytes()
    assert "0 to caption" in run_example("caption_folder.py", folder, "--model", bundle)
    assert out.read_bytes() == before

    # a deleted line is redone, and only that one
    lines = before.decode().splitlines(keepends=True)
    out.write_text("".join(line for line in lines if names[1] not in line))
    again = run_example("caption_folder.py", folder, "--model", bundle)
    assert "1 to caption" in again and "captioned 1, errors 0" in again
    assert sorted(r["path"] for r in read_jsonl(out)) == sorted(records)
    assert read_jsonl(out)[-1] == records[names[1]]  # same adapter, same image: the same caption

    # a torn last line (killed mid-write) is cut off and its image redone; the file stays valid JSONL
    kept = [line for line in out.read_text().splitlines(keepends=True) if names[2] not in line]
    out.write_text("".join(kept) + json.dumps(records[names[2]])[:20])
    assert "1 to caption" in run_example("caption_folder.py", folder, "--model", bundle)
    assert sorted(r["path"] for r in read_jsonl(out)) == sorted(records)


def test_caption_folder_refuses_a_missing_folder(bundle, tmp_path):
    proc = start("caption_folder.py", tmp_path / "nope", "--model", bundle)
    assert proc.returncode != 0 and "is not a folder" in proc.stderr


def trace(out: str) -> dict:
    lines = {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    assert {"tool call", "tool result", "final answer"} <= set(lines), out
    return lines


def test_tool_agent_with_local_smollm2(bundle, sample_image):
    out = run_example("tool_agent.py", sample_image, "Is there a red circle in my picture?", "--model", bundle,
                      timeout=300)
    lines = trace(out)
    assert lines["tool call"].startswith("analyze_image(question=")
    result = json.loads(lines["tool result"])
    assert result["adapter"] in ("vqa", "caption") and isinstance(result["answer"], str)


class FakeLLM:
    """An OpenAI-compatible endpoint on loopback that replays scripted messages and records requests."""

    def __init__(self, replies: list[dict]):
        self.replies, self.requests = list(replies), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                assert self.path == "/v1/chat/completions"
                fake.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                data = json.dumps({"choices": [{"index": 0, "message": fake.replies.pop(0)}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_llm(request):
    llm = FakeLLM(request.param)
    yield llm
    llm.close()


TOOL_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_7", "type": "function",
     "function": {"name": "analyze_image", "arguments": json.dumps({"question": "how many squares?"})}}]}
FINAL = {"role": "assistant", "content": "There are some squares."}


@pytest.mark.parametrize("fake_llm", [[TOOL_CALL, FINAL]], indirect=True)
def test_tool_agent_speaks_openai_function_calling(fake_llm, bundle, sample_image):
    out = run_example("tool_agent.py", sample_image, "Any squares?", "--model", bundle, "--llm-url", fake_llm.url)
    lines = trace(out)
    assert "falling back" not in out
    assert lines["tool call"] == "analyze_image(question='how many squares?')"  # the LLM's question, not ours
    assert lines["final answer"] == FINAL["content"]

    first, second = fake_llm.requests
    assert first["tools"][0]["function"]["name"] == "analyze_image"
    assert first["messages"][-1] == {"role": "user", "content": "Any squares?"}
    # the result goes back as the standard assistant tool_calls + tool message pair, same call id
    call, result = second["messages"][-2:]
    assert call["tool_calls"][0]["id"] == "call_7" and result["role"] == "tool" and result["tool_call_id"] == "call_7"
    assert json.loads(result["content"]) == json.loads(lines["tool result"])
    assert json.loads(result["content"])["adapter"] == "vqa"  # "how many" is routed to the VQA adapter


@pytest.mark.parametrize("fake_llm", [[{"role": "assistant", "content": "I think yes."}, FINAL]], indirect=True)
def test_tool_agent_falls_back_to_the_users_question(fake_llm, bundle, sample_image):
    out = run_example("tool_agent.py", sample_image, "Describe the picture.", "--model", bundle,
                      "--llm-url", fake_llm.url)
    assert "falling back to the user's question" in out
    lines = trace(out)
    assert lines["tool call"] == "analyze_image(question='Describe the picture.')"
    assert json.loads(lines["tool result"])["adapter"] == "caption"
    assert lines["final answer"] == FINAL["content"] and len(fake_llm.requests) == 2
