"""`/save` in the chat: no folders created, nothing overwritten without `/save!`, clear messages."""
import io
import json

import pytest
from rich.console import Console

from mmagent.chat import HELP, ChatSession, handle_command


class SilentAgent:
    adapters = ["vqa"]


@pytest.fixture
def session(sample_image):
    s = ChatSession(SilentAgent(), sample_image)
    s.history = [("is there a circle?", "yes")]
    return s


def run(session, line: str) -> str:
    out = io.StringIO()
    handle_command(session, line, Console(file=out, width=300))
    return " ".join(out.getvalue().split())


def test_save_does_not_create_folders(session, tmp_path):
    target = tmp_path / "no" / "such" / "chat.json"
    with pytest.raises(FileNotFoundError, match=r"folder `.*no/such` does not exist"):
        session.save(target)
    assert not (tmp_path / "no").exists()
    assert "error: folder" in run(session, f"/save {target}") and not (tmp_path / "no").exists()


def test_save_keeps_an_existing_file_unless_save_bang(session, tmp_path):
    target = tmp_path / "notes.json"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match=r"already exists.*/save! "):
        session.save(target)
    printed = run(session, f"/save {target}")
    assert "already exists" in printed and "/save!" in printed
    assert target.read_text() == "mine"
    assert "saved to" in run(session, f"/save! {target}")
    assert json.loads(target.read_text())["turns"] == [{"user": "is there a circle?", "assistant": "yes"}]
    assert not [p for p in tmp_path.iterdir() if p.name != "notes.json"]  # no temp file left


def test_save_to_a_folder_is_a_clear_error(session, tmp_path):
    printed = run(session, f"/save {tmp_path}")
    assert "is a folder; give a file name" in printed and "Errno" not in printed
    assert list(tmp_path.iterdir()) == []


def test_help_documents_save_bang(session):
    assert "/save! PATH" in HELP and "/save!" in run(session, "/help")
