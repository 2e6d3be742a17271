"""Chat on an image: `ChatSession` for code, `run_terminal_chat` for `mmagent chat IMAGE`."""
from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from mmagent.adapters import require
from mmagent.files import atomic_write_json
from mmagent.images import ImageError, load_image

HELP = ("/image PATH  change image   /adapter NAME  use an adapter (auto = router)   /adapters  list\n"
        "/reset  forget the conversation   /save PATH  save it as JSON (never over an existing file)\n"
        "/save! PATH  save, replacing PATH if it exists   /quit  leave")


class ChatSession:
    """Turns on one image; each answer sees the earlier turns."""

    MAX_TURNS = 8  # earlier turns are dropped so a long chat stays inside the model's context

    def __init__(self, agent, image, adapter: str | None = None):
        self.agent, self.adapter = agent, adapter
        self.history: list[tuple[str, str]] = []
        self.set_image(image)

    def set_image(self, image) -> None:
        self.image = load_image(image)  # checked now, so a bad path fails at the command, not the next turn
        self.image_ref = str(image) if isinstance(image, (str, Path)) else type(image).__name__
        self.history = []

    def send(self, text: str, on_text=None):
        answer = self.agent.ask(self.image, text, self.adapter, history=self.history[-self.MAX_TURNS:],
                                on_text=on_text)
        self.history.append((text, answer.text))
        return answer

    def reset(self) -> None:
        self.history = []

    def save(self, path, overwrite: bool = False) -> Path:
        """Write the conversation as JSON, atomically. The folder must exist (none is created); an existing
        file is kept unless `overwrite` (in the terminal chat: `/save! PATH`)."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise IsADirectoryError(f"`{path}` is a folder; give a file name, e.g. {path / 'chat.json'}")
        folder = path.parent
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"`{folder}` is a file, not a folder; save to a path inside a folder")
        if not folder.is_dir():
            raise FileNotFoundError(f"folder `{folder}` does not exist; create it first or save elsewhere "
                                    "(no folder is created for you)")
        if path.exists() and not overwrite:
            raise FileExistsError(f"`{path}` already exists and was left as it is; choose another name, or replace "
                                  f"it with `/save! {path}` (ChatSession.save(path, overwrite=True))")
        data = {"image": self.image_ref, "adapter": self.adapter,
                "turns": [{"user": q, "assistant": a} for q, a in self.history]}
        try:
            atomic_write_json(path, data)
        except PermissionError as e:
            raise PermissionError(f"cannot write `{path}`: no permission to write in folder `{folder}`; "
                                  "save elsewhere") from e
        return path


def run_terminal_chat(agent, image, adapter: str | None, console, read=input) -> None:
    session = ChatSession(agent, image, adapter)
    console.print(f"chatting about [bold]{escape(str(image))}[/]; adapters: {', '.join(agent.adapters) or 'none'}. /help for commands")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        if line.startswith("/"):
            if handle_command(session, line, console) == "quit":
                return
            continue
        console.print("model> ", end="")
        try:
            answer = session.send(line, on_text=lambda piece: console.print(piece, end="", markup=False,
                                                                            highlight=False))
        except ValueError as e:  # e.g. a conversation longer than the context: say so, keep the session
            console.print(f"\n[red]error:[/] {escape(str(e))}")
            continue
        console.print(f"\n[dim]({escape(answer.adapter or 'base')}: {escape(answer.reason)})[/]")


def handle_command(session: ChatSession, line: str, console) -> str | None:
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    agent = session.agent
    try:
        if cmd in ("/quit", "/exit"):
            return "quit"
        if cmd == "/help":
            console.print(escape(HELP))
        elif cmd == "/adapters":
            for name in agent.adapters:
                info = agent.adapter_info(name)
                console.print(f"  {name}: {', '.join(info.kinds)} (adapts {', '.join(info.parts)})"
                              + ("  [active]" if name == session.adapter else ""))
        elif cmd == "/adapter":
            if arg != "auto":
                require(arg, agent.adapters, choices=("auto",))
            session.adapter = None if arg == "auto" else arg
            console.print(f"adapter: {arg}")
        elif cmd == "/image":
            session.set_image(arg)
            console.print(f"image: {escape(arg)} (conversation reset)")
        elif cmd == "/reset":
            session.reset()
            console.print("conversation reset")
        elif cmd in ("/save", "/save!"):
            console.print(f"saved to {escape(str(session.save(arg or 'chat.json', overwrite=cmd == '/save!')))}")
        else:
            console.print(f"[red]unknown command[/] {escape(cmd)}; {escape(HELP)}")
    except (KeyError, ImageError, OSError) as e:
        console.print(f"[red]error:[/] {escape(str(e.args[0] if isinstance(e, KeyError) else e))}")
    return None
