"""Caption every image in a folder into a JSONL file, resuming where a previous run stopped.

    python agent_examples/caption_folder.py photos/ --model bundle/               # writes photos/captions.jsonl
    python agent_examples/caption_folder.py photos/ --out caps.jsonl --model runs/caption

One line per image, appended and flushed as soon as it is done, so a crash or Ctrl-C loses at most the
image in flight: {"path": "sub/a.png", "caption": "...", "adapter": "caption"} (path relative to the
folder), or {"path": ..., "error": "..."} for an image that cannot be read. A rerun skips every path
already in the file; delete a line to redo that image.
"""
import argparse
import json
import os
from pathlib import Path

from rich.progress import Progress

from mmagent import Agent

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def done_paths(out: Path) -> set[str]:
    """Paths already in the JSONL. A torn last line (killed mid-write) is cut off so appends stay valid."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(out, "r+b") as f:
            f.truncate(len(data))
    done = set()
    for line in data.decode().splitlines():
        try:
            done.add(json.loads(line)["path"])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged line: that image is captioned again
    return done


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default="images", type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", type=Path, help="JSONL to write (default: FOLDER/captions.jsonl)")
    p.add_argument("--model", default="runs/vqa", help="bundle, run directory or model directory")
    p.add_argument("--adapter", help="adapter to caption with (default: the router, which picks a caption adapter)")
    p.add_argument("--prompt", default="Describe the picture.")
    args = p.parse_args()
    if not args.folder.is_dir():
        raise SystemExit(f"error: `{args.folder}` is not a folder")
    out = args.out or args.folder / "captions.jsonl"

    images = sorted(f for f in args.folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    done = done_paths(out)
    todo = [f for f in images if f.relative_to(args.folder).as_posix() not in done]
    print(f"{len(images)} images, {len(images) - len(todo)} already in {out}, {len(todo)} to caption")
    if not todo:
        return
    try:
        agent = Agent.load(args.model)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if args.adapter is not None:  # fail now, not once per image
        try:
            agent.adapter_info(args.adapter)
        except KeyError as e:
            raise SystemExit(f"error: {e}") from None
    captioned = errors = 0
    with open(out, "a", encoding="utf-8") as f, Progress() as progress:
        task = progress.add_task("captioning", total=len(todo))
        for image in todo:
            record = {"path": image.relative_to(args.folder).as_posix()}
            try:
                answer = agent.ask(image, args.prompt, adapter=args.adapter)
                record.update(caption=answer.text, adapter=answer.adapter)
                captioned += 1
            except ValueError as e:  # the SDK's ImageError: unreadable, truncated, too large, wrong format
                record["error"] = str(e)
                errors += 1
            f.write(json.dumps(record) + "\n")  # one write per line, flushed and synced: resumable
            f.flush()
            os.fsync(f.fileno())
            progress.advance(task)
    print(f"captioned {captioned}, errors {errors} -> {out}")


if __name__ == "__main__":
    main()
