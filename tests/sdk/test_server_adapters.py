"""A task adapter added to a bundle that is being served (`mmagent export RUN --into BUNDLE`), then loaded,
used and unloaded over the server's API while other requests run."""
import base64
import json
import shutil
import threading

import openai
import pytest
from openai import OpenAI

from mmagent.files import sha256_file


def snapshot(bundle) -> dict:
    """Every file of the bundle -> (sha256, mtime in ns): what "nothing else rewritten" is checked against."""
    return {str(f.relative_to(bundle)): (sha256_file(f), f.stat().st_mtime_ns)
            for f in sorted(bundle.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def vqa_bundle(tmp_path_factory, two_runs):
    """A bundle of the VQA run alone; the caption run (with a soft prompt) is added to it live."""
    from mmagent.export.bundle import export_bundle
    out = tmp_path_factory.mktemp("into") / "edge"
    export_bundle([two_runs[0]], out, gguf=True, onnx=True, quants=("f16",))
    return out


def chat(client, image_url, question, model):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image_url}}]}])


@pytest.mark.slow
def test_an_adapter_added_to_a_served_bundle_loads_live(vqa_bundle, two_runs, bundle, sample_image):
    from mmagent import Agent
    from mmagent.bundle import verify
    from mmagent.export.bundle import add_to_bundle
    from mmagent.server import Running, Settings
    url = "data:image/png;base64," + base64.b64encode(sample_image.read_bytes()).decode()
    with Agent.load(bundle, n_threads=1) as together:  # the same two runs exported in one go
        expected_caption = together.ask(sample_image, "Describe it.", adapter="caption").text
    agent = Agent.load(vqa_bundle, n_threads=1, lanes=2)
    with Running(agent, settings=Settings(api_key="k")) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=60)
        alone = chat(client, url, "is there a circle?", "vqa").choices[0].message.content
        stop, outcomes = threading.Event(), []

        def traffic():  # vqa requests all along: through the export, the load, the unload and the reload
            while not stop.is_set():
                try:
                    outcomes.append(chat(client, url, "is there a circle?", "vqa").choices[0].message.content)
                except openai.NotFoundError:
                    outcomes.append(404)

        threads = [threading.Thread(target=traffic) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            before = snapshot(vqa_bundle)
            add_to_bundle([two_runs[1]], vqa_bundle)
            after = snapshot(vqa_bundle)
            described = ("manifest.json", "README.md")  # the manifest and the model card list the adapters
            assert {k: v for k, v in after.items() if k in before and k not in described} == \
                {k: v for k, v in before.items() if k not in described}  # nothing else rewritten
            card = (vqa_bundle / "README.md").read_text()
            assert "### caption" in card and "### vqa" in card and "`caption`, added later" in card
            manifest = verify(vqa_bundle)  # the new manifest lists the new files with their sha256
            assert set(manifest["adapters"]) == {"vqa", "caption"}
            added = set(manifest["adapters"]["caption"]["files"].values())
            assert set(after) - set(before) == added and "adapters/caption/soft_prompt.safetensors" in added
            sc = manifest["adapters"]["caption"]["selfcheck"]["greedy_f16"]
            assert sc["identical"] == sc["cases"] > 0

            listed = client.get("/adapters", cast_to=object)["data"]
            assert {a["id"]: a["loaded"] for a in listed} == {"vqa": True, "caption": False}
            with pytest.raises(openai.NotFoundError):
                chat(client, url, "Describe it.", "caption")
            assert client.post("/adapters", body={"name": "caption"}, cast_to=object)["loaded"] is True
            assert chat(client, url, "Describe it.", "caption").choices[0].message.content == expected_caption

            assert client.delete("/adapters/vqa", cast_to=object)["deleted"] is True  # while vqa requests run
            with pytest.raises(openai.NotFoundError):
                chat(client, url, "is there a circle?", "vqa")
            assert client.post("/adapters", body={"name": "vqa"}, cast_to=object)["loaded"] is True
            n = len(outcomes)
            while len(outcomes) < n + 4:  # answered again after the reload
                threading.Event().wait(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
    agent.close()
    assert alone in outcomes and set(outcomes) <= {alone, 404}, set(outcomes)  # every answer as if served alone


@pytest.mark.slow
def test_into_refuses_a_name_the_bundle_has_and_another_base(vqa_bundle, two_runs, tmp_path):
    from typer.testing import CliRunner

    from mmagent.cli import app
    before = snapshot(vqa_bundle)
    result = CliRunner().invoke(app, ["export", str(two_runs[0]), "--into", str(vqa_bundle)])
    assert result.exit_code == 2 and "already has an adapter `vqa`" in " ".join(result.output.split())
    assert snapshot(vqa_bundle) == before and not list(vqa_bundle.glob(".adapters-added*"))

    other = tmp_path / "other"
    shutil.copytree(vqa_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["base"]["fingerprint"] = "0123456789abcdef"  # as if exported from another base
    (other / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["export", str(two_runs[1]), "--into", str(other)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "the bundle holds" in said and "(0123456789abcdef)" in said
