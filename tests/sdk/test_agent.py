"""Agent over both backends: switching, streaming, threads, two agents, bad input."""
import threading

import pytest

from mmagent import Agent
from mmagent.images import ImageError

BACKENDS = ["torch", "edge"]



@pytest.mark.parametrize("backend", BACKENDS)
def test_ask_routes_and_reports(agents, backend, sample_image):
    agent = agents[backend]
    assert sorted(agent.adapters) == ["caption", "vqa"]
    assert agent.adapter_info("caption").soft_prompt_tokens == 4
    assert set(agent.adapter_info("vqa").parts) == {"llm", "bridge", "vision"}  # recipes/vqa.toml adapts all three
    a = agent.ask(sample_image, "Describe the picture.", max_new_tokens=6)
    assert a.adapter == "caption" and "description" in a.reason and a.timings["total"] > 0
    assert agent.ask(sample_image, "is there a circle?", max_new_tokens=6).adapter == "vqa"
    with agent.using("caption"):
        assert agent.ask(sample_image, "is there a circle?", max_new_tokens=4).adapter == "caption"
        assert agent.ask(sample_image, "is there a circle?", adapter="vqa", max_new_tokens=4).adapter == "vqa"
    assert agent.ask(sample_image, "is there a circle?", max_new_tokens=4).adapter == "vqa"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_joins_to_the_answer(agents, backend, sample_image):
    agent = agents[backend]
    pieces = list(agent.stream(sample_image, "Describe the picture.", max_new_tokens=12))
    assert "".join(pieces).strip() == agent.ask(sample_image, "Describe the picture.", max_new_tokens=12).text


PROBES = ["what shape is on the left?", "is there a circle?", "how many squares?", "Describe the picture.",
          "what colour is the big shape?"]


def active_adapter(backend, lane: int):
    """The adapter the backend really has applied on `lane` (llama.cpp context / PEFT model) right now."""
    if hasattr(backend, "lms"):
        return backend.lms[lane].active_adapter
    return backend.vlm.model.active_adapter


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_sharing_one_agent_never_see_each_others_adapter(agents, backend, sample_image, monkeypatch):
    agent = agents[backend]
    answers = {(n, q): agent.ask(sample_image, q, adapter=n, max_new_tokens=8).tokens
               for n in ("vqa", "caption") for q in PROBES}
    probes = [q for q in PROBES if answers["vqa", q] != answers["caption", q]]
    assert probes, "the two adapters answer every probe alike, so a mixed-up adapter could not be seen"
    wanted, seen, errors = threading.local(), [], []
    generate = agent.backend.generate

    def recording_generate(*args, **kw):  # runs on the call's own lane: what is applied there is what it used
        out = generate(*args, **kw)
        seen.append((wanted.name, active_adapter(agent.backend, kw.get("lane", 0)), args[1], out[0]))
        return out

    monkeypatch.setattr(agent.backend, "generate", recording_generate)

    def worker(name):
        wanted.name = name
        try:
            with agent.using(name):
                for q in probes * 2:
                    agent.ask(sample_image, q, max_new_tokens=8)
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ["vqa", "caption"] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(seen) == 8 * len(probes)
    assert all(used == name and tokens == answers[name, q] for name, used, q, tokens in seen)


def test_two_agents_in_one_process_keep_their_own_adapter(bundle, sample_image):
    a, b = Agent.load(bundle), Agent.load(bundle)
    ref_vqa = a.ask(sample_image, "how many squares?", adapter="vqa", max_new_tokens=6).tokens
    ref_cap = b.ask(sample_image, "how many squares?", adapter="caption", max_new_tokens=6).tokens
    with a.using("vqa"), b.using("caption"):
        for _ in range(2):
            assert a.ask(sample_image, "how many squares?", max_new_tokens=6).tokens == ref_vqa
            assert b.ask(sample_image, "how many squares?", max_new_tokens=6).tokens == ref_cap


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_a_clear_error(agents, backend, tmp_path):
    agent = agents[backend]
    with pytest.raises(ImageError, match="does not exist"):
        agent.ask(tmp_path / "none.png", "hi?")
    with pytest.raises(KeyError, match="no adapter `ocr`"):
        with agent.using("ocr"):
            pass


def test_chat_session_keeps_history_and_saves(agents, sample_image, tmp_path):
    import json
    chat = agents["edge"].chat(sample_image)
    first = chat.send("what shape is on the left?")
    chat.send("and its colour?")
    saved = json.loads(chat.save(tmp_path / "c.json").read_text())
    assert [t["user"] for t in saved["turns"]] == ["what shape is on the left?", "and its colour?"]
    assert saved["turns"][0]["assistant"] == first.text
    chat.reset()
    assert chat.history == []


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Agent.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        Agent.load(tmp_path / "empty")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_follows_using_and_an_abandoned_stream_frees_the_agent(agents, backend, sample_image):
    agent = agents[backend]
    want = agent.ask(sample_image, "is there a circle?", adapter="caption", max_new_tokens=8).text
    with agent.using("caption"):
        got = "".join(agent.stream(sample_image, "is there a circle?", max_new_tokens=8)).strip()
    assert got == want
    pieces = agent.stream(sample_image, "Describe the picture.", max_new_tokens=40)
    next(pieces)
    pieces.close()  # the consumer walks away after one piece
    assert agent.ask(sample_image, "is there a circle?", max_new_tokens=2).adapter == "vqa"  # not blocked


def test_agent_closes_its_native_memory(bundle, sample_image):
    with Agent.load(bundle) as agent:
        agent.ask(sample_image, "is there a circle?", max_new_tokens=2)
    assert agent.backend.llm._ctx is None
