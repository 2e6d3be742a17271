"""The `mmagent` command: each subcommand is one call into the package (imports stay lazy for a fast --help).

    mmagent train recipes/vqa.toml            train a task adapter (builds builtin:tiny on first use)
    mmagent export runs/vqa --gguf --onnx -o bundle
    mmagent chat photo.png --model bundle
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Fine-tune a vision-language model, export it to the edge, use it from agent code.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate builtin:shapes, convert COCO/VQAv2.")
base_app = typer.Typer(no_args_is_help=True, help="Base models: build the embedded defaults.")
app.add_typer(data_app, name="data")
app.add_typer(base_app, name="base")
console = Console()
err = Console(stderr=True)


def fail(e: Exception) -> None:
    from rich.markup import escape
    err.print(f"[bold red]error:[/] {escape(str(e))}")
    raise typer.Exit(2)


from mmagent.isolate import NativeCrash  # noqa: E402  (stdlib only: keeps --help fast)

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, FileExistsError, NativeCrash)


@app.command()
def train(recipe: Path = typer.Argument(..., help="recipe TOML, e.g. recipes/vqa.toml"),
          overrides: Optional[list[str]] = typer.Argument(None, help="key=value, e.g. train.steps=50"),
          resume: bool = typer.Option(False, "--resume", help="continue from the run's latest checkpoint"),
          gpus: int = typer.Option(1, "--gpus", min=1, help="train on N GPUs of this machine (DDP through "
                                   "accelerate; without GPUs, N CPU processes on gloo); the same recipe and "
                                   "steps on any N")):
    """Train a task adapter (or, with train.method=full, a base) from a recipe."""
    from mmagent.train.recipe import load_recipe
    from mmagent.train.run import run_recipe
    from mmagent.train.rundir import TrainingInterrupted
    if gpus > 1:
        _launch_processes(gpus, recipe, overrides or [], resume)
    try:
        run_recipe(load_recipe(recipe, overrides or []), resume, console)
    except USER_ERRORS as e:
        fail(e)
    except TrainingInterrupted as e:  # SIGINT/SIGTERM: checkpointed; exit 130 / 143 as a shell would
        from rich.markup import escape
        err.print(f"[bold yellow]stopped:[/] {escape(str(e))}")
        raise typer.Exit(e.exit_code)


def _launch_processes(gpus: int, recipe: Path, overrides: list[str], resume: bool) -> None:
    """`--gpus N`: check the recipe here (one error, not N), then run N training processes."""
    from mmagent.train.distributed import launch
    from mmagent.train.recipe import load_recipe
    try:
        from mmagent.train.build import ensure_base
        ensure_base(load_recipe(recipe, overrides).model.base, quiet=console.quiet)  # once, before the ranks start
        code = launch(gpus, ["train", str(recipe), *overrides, *(["--resume"] if resume else [])])
    except USER_ERRORS as e:
        fail(e)
    raise typer.Exit(code)


@app.command("eval")
def evaluate(run: Path = typer.Argument(..., help="run directory"),
             base: bool = typer.Option(False, "--base", help="evaluate the base without the adapter too")):
    """Evaluate a finished run's adapter on its recipe's held-out tasks."""
    from mmagent.train.run import evaluate_run
    try:
        evaluate_run(run, base, console)
    except USER_ERRORS as e:
        fail(e)


@app.command()
def report(runs: list[Path] = typer.Argument(..., help="run directories; several are put side by side"),
           out: Optional[Path] = typer.Option(None, "-o", "--out", help="where a comparison of several runs goes "
                                              "(default reports/<run>-vs-<run>)")):
    """Write a run's report again (report.md with plots, gallery.md, README.md), or compare several runs:
    one plot per metric, one line per run."""
    from mmagent.train.report import regenerate
    try:
        console.print(f"report: [bold]{regenerate(runs, out)}[/]")
    except USER_ERRORS as e:
        fail(e)


@data_app.command("shapes")
def data_shapes(out: Path = typer.Argument(..., help="folder to write"),
                train_images: int = 2000, eval_images: int = 200, seed: int = 0, image_size: int = 64):
    """Write the builtin:shapes world in COCO-captions and VQAv2 formats."""
    from mmagent.train.data.shapes import write_world
    console.print(f"wrote {write_world(out, train_images, eval_images, seed, image_size)}")


@data_app.command("prepare")
def data_prepare(out: Path = typer.Argument(..., help="JSONL file to write"),
                 captions: Optional[Path] = typer.Option(None, help="COCO captions_*.json"),
                 questions: Optional[Path] = typer.Option(None, help="VQAv2 questions JSON"),
                 annotations: Optional[Path] = typer.Option(None, help="VQAv2 annotations JSON"),
                 images: Path = typer.Option(..., help="image folder of those files")):
    """Convert COCO captions and/or VQAv2 files into the unified instruction JSONL (absolute image paths).

    A malformed entry is an error naming the file and the entry; entries that cannot be joined (captions of
    images the file does not list, questions without an annotation) are left out and counted in a
    `warning:` line; a record whose image file is missing from --images is an error.
    """
    import warnings
    from mmagent.train.data.records import DataError, DataWarning, coco_captions, missing_images, vqa_v2, write_jsonl
    if not captions and not questions:
        fail(ValueError("give --captions and/or --questions with --annotations"))
    if questions and not annotations:
        fail(ValueError("--questions needs --annotations (the VQAv2 answers file)"))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            records = (coco_captions(captions, images) if captions else []) + \
                      (vqa_v2(questions, annotations, images) if questions else [])
        for w in caught:
            if issubclass(w.category, DataWarning):
                from rich.markup import escape
                err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if not records:
            raise DataError("no records to write: the given files hold no caption or answered question")
        missing = missing_images(records)
        if missing:
            raise DataError(f"{len(missing)} image file(s) the records name are not in `{images}`, e.g. "
                            f"`{missing[0]}`; check --images (and that it matches the annotation files' split)")
        write_jsonl(records, out)
    except USER_ERRORS as e:
        fail(e)
    console.print(f"wrote {len(records)} records to {out}")


@base_app.command("build")
def base_build(name: str = typer.Argument("tiny", help="tiny | smol")):
    """Build (or find cached) builtin:NAME from recipes/align.toml."""
    from mmagent.train.build import ensure_builtin
    try:
        console.print(f"builtin:{name} -> {ensure_builtin(name)}")
    except USER_ERRORS as e:
        fail(e)


@app.command()
def export(runs: list[Path] = typer.Argument(..., help="run directories (or adapter folders) on one base"),
           out: Optional[Path] = typer.Option(None, "-o", "--out", help="bundle directory to write"),
           into: Optional[Path] = typer.Option(None, "--into", help="add the runs' adapters to this existing "
                                               "bundle (same base; self-checked; nothing else rewritten)"),
           gguf: bool = typer.Option(False, "--gguf", help="LLM + task LoRAs as GGUF for llama.cpp"),
           onnx: bool = typer.Option(False, "--onnx", help="vision + Q-Former + task LoRAs as ONNX"),
           quant: list[str] = typer.Option(["f16"], "--quant", help="f16 | q8_0 | q4_k_m (repeatable)"),
           merged: bool = typer.Option(False, "--merged", help="also write merged HF directories"),
           force: bool = typer.Option(False, "--force", help="replace an existing bundle")):
    """Export runs to one edge bundle that carries every adapter and checks itself against torch, or add
    their adapters to an existing bundle (--into), which a running `mmagent serve` can then load."""
    from mmagent.export.bundle import add_to_bundle, export_bundle
    if (out is None) == (into is None):
        fail(ValueError("give either -o DIR (a new bundle) or --into BUNDLE (add adapters to an existing one)"))
    if into is not None:
        if merged or force:
            fail(ValueError("--into adds adapters in the bundle's own formats; --merged and --force apply to -o"))
        try:
            add_to_bundle(runs, into, console)
        except USER_ERRORS as e:
            fail(e)
        return
    if not (gguf or onnx or merged):
        fail(ValueError("choose at least one of --gguf, --onnx, --merged (an edge bundle is --gguf --onnx)"))
    try:
        export_bundle(runs, out, gguf, onnx, ["f16", *[q for q in quant if q != "f16"]], merged, force, console)
    except USER_ERRORS as e:
        fail(e)


@app.command()
def info(path: Path = typer.Argument(..., help="a bundle or a run directory")):
    """Verify, then show what a bundle or run holds: components, adapters and what each adapts, sizes, self-check.

    Every file the manifest lists is checked (present, size, sha256), and the manifest itself (schema,
    required keys). A damaged bundle or run is not described: every problem is listed and the exit code
    is 1. A path that is neither a bundle nor a run directory: exit 2.
    """
    from mmagent.bundle import DamagedBundle
    from mmagent.export.info import show
    try:
        show(path, console)
    except DamagedBundle as e:
        from rich.markup import escape
        err.print(f"[bold red]damaged:[/] {escape(str(e))}")
        raise typer.Exit(1)
    except USER_ERRORS as e:
        fail(e)


DEVICE_HELP = ("cpu | cuda; default: the edge backend on the CPU, the torch backend on CUDA when torch sees a GPU. "
               "cuda: llama.cpp with every layer on the GPU and the fp16 vision graph on onnxruntime's CUDA provider "
               "(edge), bf16 (torch); an error if the CUDA build is missing, never a quiet CPU run")


@app.command()
def check(bundle: Path = typer.Argument(..., help="the bundle to check"),
          runs: list[Path] = typer.Argument(..., help="the runs it was exported from (the torch reference)"),
          device: str = typer.Option("cuda", help="cpu | cuda: where the bundle runs"),
          quant: Optional[list[str]] = typer.Option(None, "--quant", help="LLM variants to check (default: all)")):
    """Run the export's self-check on a device: the bundle there against torch in fp32 on the CPU.

    f16 greedy tokens must match torch exactly, quantised variants report agreement, vision embeddings must
    stay within tolerance, every adapter answers in turn. Exit 1 when a check fails."""
    import json
    from mmagent.export.devicecheck import check_on_device
    try:
        report = check_on_device(bundle, runs, device, quant)
    except USER_ERRORS as e:
        fail(e)
    console.print_json(json.dumps(report))
    if report["problems"]:
        raise typer.Exit(1)


@app.command()
def chat(image: Path = typer.Argument(..., help="the image to talk about"),
         model: Path = typer.Option(Path("runs/vqa"), "--model", "-m", help="bundle, run or model directory"),
         adapter: Optional[str] = typer.Option(None, help="adapter name; default: the router picks"),
         backend: str = typer.Option("auto", help="auto | torch | edge"),
         device: Optional[str] = typer.Option(None, help=DEVICE_HELP)):
    """Chat about an image in the terminal, answers streamed (/help for commands)."""
    from mmagent.agent import Agent
    from mmagent.chat import run_terminal_chat
    try:
        agent = Agent.load(model, backend, device=device)
        if adapter is not None:
            agent.adapter_info(adapter)  # refuses a name the model lacks, listing the ones it has
        run_terminal_chat(agent, image, adapter, console)
    except USER_ERRORS as e:
        fail(e)


@app.command()
def serve(model: Path = typer.Argument(..., help="bundle, run or model directory"),
          host: str = typer.Option("127.0.0.1", help="address to listen on; another than localhost wants --api-key"),
          port: int = 8000, backend: str = "auto",
          lanes: int = typer.Option(0, help="requests generated at once (edge: llama.cpp contexts over one "
                                    "model); 0 = one per free core, up to 4"),
          queue: int = typer.Option(16, help="requests that may wait for a lane; one more gets 429"),
          api_key: Optional[str] = typer.Option(None, envvar="MMAGENT_API_KEY",
                                                help="require `Authorization: Bearer KEY` on every route but /health"),
          timeout: float = typer.Option(120.0, help="seconds a request may take, waiting included (504 after)"),
          max_tokens: int = typer.Option(1024, help="the most new tokens a request may ask for"),
          max_body_mb: float = typer.Option(16.0, help="largest request body (413 above)"),
          max_image_mp: float = typer.Option(16.0, help="largest image in megapixels (413 above)"),
          allow_local_files: bool = typer.Option(False, help="accept image URLs that are paths on this machine"),
          device: Optional[str] = typer.Option(None, help=DEVICE_HELP)):
    """Serve the model with an OpenAI-compatible API (/v1/chat/completions, /v1/models, /v1/adapters, /health).

    Ctrl-C or SIGTERM stops taking requests and finishes those in flight.
    """
    import logging
    from mmagent.agent import Agent
    from mmagent.server import Settings, server
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmagent.server").setLevel(logging.INFO)
    settings = Settings(api_key=api_key, allow_local_files=allow_local_files, max_body_bytes=int(max_body_mb * 2**20),
                        max_image_pixels=int(max_image_mp * 1e6), max_tokens=max_tokens, queue=queue,
                        timeout_s=timeout)
    try:
        edge = backend == "edge" or (backend == "auto" and (model / "manifest.json").exists())
        agent = Agent.load(model, backend, device=device, **({"lanes": lanes or default_lanes()} if edge else {}))
        uvicorn_server = server(agent, host, port, settings)
    except USER_ERRORS as e:
        fail(e)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who reaches it can use it")
    console.print(f"serving {model} on http://{host}:{port}/v1 ({agent.lanes} lane(s), adapters: "
                  f"{', '.join(agent.adapters) or 'none'})")
    uvicorn_server.run()  # SIGINT/SIGTERM: no new connections, in-flight requests finish
    agent.close()


def default_lanes() -> int:
    """One lane per usable core (llama.cpp: one thread each for small models), at most 4."""
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


@app.callback()
def options(verbose: bool = typer.Option(False, "--verbose", "-v", help="also show third-party progress bars, "
                                                                     "warnings and logs")):
    if not verbose:
        quiet_third_party()


def quiet_third_party() -> None:
    """Our progress and tables only: transformers' load/save bars, FutureWarnings and torch.onnx's notices
    (e.g. torchvision missing) are set aside before those libraries are imported."""
    import logging
    import os
    import warnings
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    third_party = r"(torch|transformers|peft|onnx|onnxscript|onnxruntime|copyreg)(\.|$)"
    for category in (FutureWarning, DeprecationWarning, UserWarning):  # ours (DataWarning, ...) still show
        warnings.filterwarnings("ignore", category=category, module=third_party)
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
