"""The training recipe runner: setup -> train -> evaluate -> save. One class, read top to bottom.

    mmagent train recipes/vqa.toml [--resume] [train.steps=100 ...]
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mmagent.files import atomic_write_bytes, atomic_write_json
from mmagent.images import ImageError, load_image
from mmagent.prompt import default_instruction
from mmagent.train import adapters as ad
from mmagent.train.checkpoint import checkpoints, gather_state, load_checkpoint, save_checkpoint
from mmagent.train.data.records import DataError
from mmagent.train.data.stream import TaskMixture
from mmagent.train.data.tasks import check_images_exist, eval_subset, file_digests, task_records
from mmagent.train.distributed import Ranks
from mmagent.train.evaluate import answer_vocabulary, evaluate_tasks
from mmagent.train.families import expand_presets
from mmagent.train.recipe import Recipe
from mmagent.train.report import read_metrics, write_report
from mmagent.train.tensorboard_log import TensorBoardLog, require_tensorboard
from mmagent.train.rundir import RunLock, TrainingInterrupted, check_fresh, check_resume
from mmagent.train.vlm import VLM


MAX_BAD_IN_A_ROW = 100  # a skip is for the odd broken file, not for a folder of them
# held-out examples a task for the base's evaluation (ranked: 13 answers scored a question, so slow), a seeded
# spread sample; 300 put the main job 5 s over its 15 minutes
BASE_EVAL = 200


def prefetched(make):
    """Yield make(), make(), ... with the next one prepared on a worker thread while the caller trains on
    this one: image decoding and tokenising overlap the GPU step. Close the generator to stop."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1, thread_name_prefix="mmagent-data") as pool:
        ahead = pool.submit(make)
        while True:
            ready = ahead.result()
            ahead = pool.submit(make)
            yield ready


class LossForward(torch.nn.Module):
    """The training forward as one module, so that DDP (which syncs gradients of what its forward ran)
    wraps it: per-answer-token losses of a batch (VLM.loss, reduction="none")."""

    def __init__(self, vlm: VLM, soft_prompt):
        super().__init__()
        self.model, self.soft_prompt, self.vlm = vlm.model, soft_prompt, vlm

    def forward(self, batch: dict, vocab) -> torch.Tensor:
        sp = self.soft_prompt() if self.soft_prompt is not None else None
        return self.vlm.loss(batch, sp, vocab, reduction="none")


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def add_task_losses(sums: dict, tokens: torch.Tensor, batch: dict) -> None:
    """Add each task's answer-token losses (sum, count) from one micro-batch: rows of the batch are
    examples, `tokens` their answer tokens in row order (VLM.loss with reduction="none")."""
    rows = (batch["labels"][:, 1:] != -100).nonzero()[:, 0]
    tokens = tokens[:len(rows)]  # a static batch pads its answer tokens at the end (losses of 0)
    per_row = torch.zeros(len(batch["tasks"]), device=tokens.device).index_add_(0, rows, tokens.float())
    counts = torch.bincount(rows, minlength=len(batch["tasks"]))
    for task, s, n in zip(batch["tasks"], per_row.tolist(), counts.tolist()):
        old = sums.get(task, (0.0, 0))
        sums[task] = (old[0] + s, old[1] + n)


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (CPU, CUDA): torch's default on CPU steps each tensor in a
    Python loop (the same losses fused; on a quiet machine stage 1 took 409 s against 420 s, on a busy one
    an 80-step A/B gave 147 against 118 samples/s)."""
    tensors = [p for g in params for p in g["params"]] if isinstance(params[0], dict) else list(params)
    fused = all(p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


class Trainer:
    def __init__(self, recipe: Recipe, resume: bool = False, console: Console | None = None,
                 evaluate_only: bool = False):
        self.recipe, self.resume, self.evaluate_only = recipe, resume, evaluate_only
        self.console = console or Console()
        self.run_dir = recipe.run_dir
        # one process: rank 0 of 1; CUDA graphs on several: gradients averaged by hand (no DDP hooks)
        self.ranks = Ranks(find_unused=recipe.train.method == "full", manual=recipe.train.cuda_graphs,
                           sharding="none" if evaluate_only else recipe.train.sharding)  # fsdp: FSDP2 units
        self.device = self.ranks.device
        if not self.ranks.main:  # one voice and one writer: rank 0's
            self.console = Console(quiet=True)
        self.skipped: list[str] = []  # one message per distinct unreadable image
        self.lock: RunLock | None = None
        self.stop_signal: int | None = None
        self.board = None  # TensorBoard event files ([log] tensorboard), opened by setup
        self.task_loss: dict[str, float] = {}  # the last step's loss per task

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        self._check_run_dir()  # takes the run directory's lock: released by finish() or close()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        r = self.recipe
        torch.manual_seed(r.run.seed)
        tensorboard = r.log.tensorboard and not self.evaluate_only
        if tensorboard:
            require_tensorboard()  # missing: refused before any data or base work
        self._setup_data()
        model, tokenizer, image_processor, self.base = self._load_base()
        self.vlm = VLM(model, tokenizer, image_processor, r.model.system)
        self._make_trainable()
        self._set_precision()
        self.vlm.model.to(self.device)
        self.vision_align = self._align_vision() if r.contrast.steps and not (self.resume or self.evaluate_only) else None
        self._speed_up()
        self.soft_prompt = None
        if r.soft_prompt.tokens:
            embed = self.vlm.family.embed_tokens(self.vlm.base_model)
            self.soft_prompt = ad.SoftPrompt(embed, r.soft_prompt.tokens, r.run.seed).to(self.device)
        self.ranks.check_batch(r.train.batch_size)
        self.forward = self.ranks.wrap(LossForward(self.vlm, self.soft_prompt))  # DDP on several processes
        if r.train.sharding == "fsdp" and self.ranks.world == 1 and not self.evaluate_only:
            self.console.print("train.sharding = fsdp on one process: nothing to shard; the model trains whole")
        elif self.ranks.sharded:
            self.console.print(f"train.sharding = fsdp: {self.ranks.units} FSDP units over {self.ranks.world} processes")
        self._setup_optimizer()
        self.loss_vocab = self._target_vocab() if r.train.loss_vocab == "targets" and self.train_records else None
        self.graphs = self._graphs()
        self.step, self.position = 0, 0
        if self.resume:
            self._resume()
        self.board = TensorBoardLog(self.run_dir, self.step) if tensorboard and self.ranks.main else None
        if not self.evaluate_only and self.ranks.main:  # recipe.json says what this run trains with, from its start
            atomic_write_json(self.run_dir / "recipe.json", r.to_dict())
        self._print_trainable()

    def _align_vision(self) -> dict:
        """BLIP-2's first stage (recipe [contrast]) on the caption tasks, before the generative training."""
        from mmagent.train.contrastive import align_vision
        r = self.recipe
        records = [rec for t in r.tasks if t.kind == "caption" for rec in self.train_records[t.name]]
        self.console.print(f"contrastive stage: {r.contrast.steps} steps of image-text contrast and matching, no LLM")
        return align_vision(self.vlm.model, self.vlm.tokenizer, self.vlm.image_processor, records, r.contrast,
                            r.run.seed, self.console)

    def _setup_data(self) -> None:
        """Records per task; evaluation alone reads only the held-out splits."""
        r = self.recipe
        self.train_records = {} if self.evaluate_only else {t.name: task_records(t, r.data, "train") for t in r.tasks}
        self.eval_records = {"eval": self._eval_split("eval")}
        if r.data.source == "builtin:shapes":  # colour x shape pairs that training never shows
            self.eval_records["comp"] = self._eval_split("comp")
        self.eval_records["base"] = {t.name: eval_subset(self.eval_records["eval"][t.name], t.kind, BASE_EVAL,
                                                         r.run.seed) for t in r.tasks}
        for name, recs in self.train_records.items():
            check_images_exist(recs, name)
        for split in ("eval", "comp"):
            for name, recs in self.eval_records.get(split, {}).items():
                check_images_exist(recs, f"{name} ({split})")
        if self.train_records:
            self._check_disjoint()
            self.mixture = TaskMixture(self.train_records, {t.name: t.ratio for t in r.tasks}, r.run.seed)

    def _eval_split(self, split: str) -> dict[str, list[dict]]:
        r = self.recipe
        return {t.name: eval_subset(task_records(t, r.data, split), t.kind, t.max_eval, r.run.seed) for t in r.tasks}

    def _target_vocab(self) -> torch.Tensor:
        """Sorted ids of every token in the training text: answers, and the prompts' tokens too, so that
        what the model reads is also pushed down as an answer (else a prompt word could win at decoding)."""
        tok, records = self.vlm.tokenizer, [rec for recs in self.train_records.values() for rec in recs]
        texts = sorted({rec[k] for rec in records for k in ("instruction", "input", "output")} |
                       {self.vlm.prompt_text(records[0]["instruction"], records[0]["input"])})
        ids = {i for ids in tok(texts, add_special_tokens=False).input_ids for i in ids} | {tok.eos_token_id}
        return torch.tensor(sorted(ids), device=self.device)

    def _setup_optimizer(self) -> None:
        """AdamW with its own group (and learning rate) for the soft prompt; warm-up then cosine."""
        r = self.recipe
        self.params = {n: p for n, p in self.vlm.model.named_parameters() if p.requires_grad}
        groups = [{"params": list(self.params.values()), "lr": r.train.lr}]
        if self.soft_prompt is not None:
            self.params["soft_prompt.vectors"] = self.soft_prompt.vectors
            groups.append({"params": [self.soft_prompt.vectors], "lr": r.soft_prompt.lr})
        self.optimizer = adamw(groups, weight_decay=r.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(r.train.warmup_steps, r.train.steps))

    def _check_run_dir(self) -> None:
        """One writer at a time (a lock held until finish/close), never a silent replacement of a run, and
        --resume only with the run's own settings (see mmagent.train.rundir)."""
        if self.evaluate_only or not self.ranks.main:  # rank 0 checks and holds the run directory for all
            return
        self.lock = RunLock(self.run_dir).acquire()
        try:
            if self.resume:
                note = check_resume(self.run_dir, self.recipe.to_dict())
                if note:
                    self.console.print(f"[yellow]{note}")
            else:
                check_fresh(self.run_dir)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let go of the run directory (its lock); finish() and run() do this."""
        if self.board is not None:
            self.board.close()
            self.board = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _check_disjoint(self) -> None:
        """Held out means held out by content: no held-out image may equal a training image, whatever its
        file name (compared by a hash of the file's bytes)."""
        for t in self.recipe.tasks:
            train = file_digests(self.train_records[t.name])
            for split in ("eval", "comp"):
                if split not in self.eval_records:
                    continue
                held = file_digests(self.eval_records[split][t.name])
                overlap = set(train) & set(held)
                if overlap:
                    raise DataError(f"task `{t.name}`: {len(overlap)} {split} image(s) show exactly what a training "
                                    f"image shows, e.g. `{held[next(iter(overlap))]}` = `{train[next(iter(overlap))]}`; "
                                    "held-out images must differ in content, not just in file name")

    def _load_base(self):
        ref = self.recipe.model.base
        if ref.startswith("init:"):
            from mmagent.train.builtin import init_base
            model, tok, proc = init_base(ref.removeprefix("init:"), seed=self.recipe.run.seed)
            from mmagent.train.base import Base
            return model, tok, proc, Base(ref, Path("."), "untrained")
        from mmagent.train.base import load, resolve
        base = resolve(ref)  # built already (mmagent.train.build.ensure_base): resolving never trains
        # bf16 weights straight from the files onto the device: a 7B never passes through fp32 in host memory
        dtype = torch.bfloat16 if self.precision in ("bf16", "bf16-true") else torch.float32
        return (*load(base, dtype, attention=self.recipe.train.attention, device=self.device), base)

    @property
    def precision(self) -> str:
        p = self.recipe.train.precision
        return ("bf16" if self.device.type == "cuda" else "fp32") if p == "auto" else p

    def _set_precision(self) -> None:
        """bf16: frozen weights in bf16, trained ones in fp32 (so are their gradients and AdamW's moments);
        bf16-true: everything in bf16; fp32 and bf16-mixed: everything in fp32 (autocast does the rest)."""
        p, model = self.precision, self.vlm.model
        if p in ("bf16", "bf16-true"):
            model.to(torch.bfloat16)
        if p == "bf16":
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()

    def _speed_up(self) -> None:
        """Gradient checkpointing and regional torch.compile of the LLM's decoder layers (recipe switches)."""
        t, base = self.recipe.train, self.vlm.base_model
        if t.gradient_checkpointing and not self.evaluate_only:
            enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable  # 5.24 renamed it
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._lora_layers = [m for m in self.vlm.model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        if t.fused_ops and not self.evaluate_only:
            from mmagent.train.fused import fuse_rms_norms, fuse_rotary, fuse_swiglu
            fuse_rms_norms(self.vlm.family.decoder(base))
            fuse_rotary(self.vlm.family.decoder(base))
            fuse_swiglu(self.vlm.family.decoder(base))
        if t.compile and not self.evaluate_only:
            for layer in self.vlm.family.decoder(base).layers:  # one compiled graph, reused by every layer
                layer.compile()

    def _graphs(self):
        """The CUDA-graph step (train.cuda_graphs) where it applies: CUDA and a decoder-only LLM (on several
        processes the gradients are averaged after the replays: Ranks.average_grads)."""
        t = self.recipe.train
        if not t.cuda_graphs or self.evaluate_only:
            return None
        why = "no CUDA device" if self.device.type != "cuda" else "an encoder-decoder LLM" if self.vlm.seq2seq else ""
        if why:
            self.console.print(f"[yellow]train.cuda_graphs: {why}; training without CUDA graphs")
            return None
        from mmagent.train.graph_step import GraphedStep
        return GraphedStep(self.forward, list(self.params.values()), self.precision != "fp32", self.loss_vocab)

    def _graphed(self, batch: dict, scale: float, first: bool):
        """(tokens, loss) of a micro-batch replayed as a CUDA graph, or None: run it eagerly. A capture that
        fails turns graphs off for the rest of the run, with one message saying why."""
        if self.graphs is None:
            return None
        from mmagent.train.graph_step import CaptureError
        try:
            return self.graphs.step(batch, scale, first)
        except CaptureError as e:
            self.console.print(f"[yellow]train.cuda_graphs: the step could not be captured ({e}); training "
                               "without CUDA graphs")
            self.graphs = None
            return None

    @contextmanager
    def _lora_in_compute_dtype(self):
        """Under autocast, PEFT's cast of each adapted layer's input to the adapter's float32 is a full copy
        of the activations that autocast casts straight back to bf16 for the product: skip it while
        training (evaluation without autocast needs it)."""
        layers = self._lora_layers if self.precision != "fp32" else []
        for m in layers:
            m.cast_input_dtype_enabled = False
        try:
            yield
        finally:
            for m in layers:
                m.cast_input_dtype_enabled = True

    def _make_trainable(self) -> None:
        r, vlm = self.recipe, self.vlm
        self.lora = expand_presets(r.lora, vlm.family, vlm.model)  # what the adapter records it adapts
        if r.train.method == "full":
            for n, p in vlm.model.named_parameters():
                p.requires_grad_(ad.part_of(n, vlm.family) in r.train.parts
                                 or (ad.part_of(n, vlm.family) == "other" and "bridge" in r.train.parts))
            return
        vlm.model = ad.inject_lora(vlm.model, vlm.family, self.lora, r.adapter_name)

    def load_adapter(self, path: Path) -> None:
        """Put a saved adapter's weights (and soft prompt) into the freshly set-up model."""
        from peft import set_peft_model_state_dict

        from mmagent.adapters import read_adapter
        adapter = read_adapter(path, framework="pt")
        adapter.check_base(self.base.fingerprint)
        set_peft_model_state_dict(self.vlm.model, dict(adapter.lora.weights), adapter_name=self.recipe.adapter_name)
        if adapter.soft_prompt is not None and self.soft_prompt is not None:
            self.soft_prompt.vectors.data.copy_(adapter.soft_prompt)

    def _print_trainable(self) -> None:
        table = Table(title=f"trainable parameters ({self.recipe.train.method})")
        for col in ("component", "trainable", "total", "%"):
            table.add_column(col, justify="right" if col != "component" else "left")
        for name, trainable, total in ad.trainable_table(self.vlm.model, self.vlm.family, self.soft_prompt):
            table.add_row(name, f"{trainable:,}", f"{total:,}", f"{100 * trainable / total:.2f}")
        self.console.print(table)

    def _resume(self) -> None:
        found = checkpoints(self.run_dir)
        if not found:
            self.console.print(f"[yellow]no checkpoint in {self.run_dir}; starting from step 0")
            self._truncate_metrics(0)  # what an earlier attempt logged is not this run's
            return
        step, path = found[-1]
        state = load_checkpoint(path, self.params, self.optimizer, self.scheduler,
                                self.forward if self.ranks.sharded else None)  # FSDP: scattered from rank 0
        self.step, self.position = state["step"], state["position"]["example"]
        self.skipped = list(dict.fromkeys(state["position"].get("skipped", [])))
        self._truncate_metrics(self.step)
        self.console.print(f"resumed from {path} (step {self.step})")

    # ---- training ------------------------------------------------------------------------------
    def next_batch(self, stream) -> dict:
        examples, self.position = self.next_examples(stream, self.recipe.train.batch_size)
        return self.collate_examples(examples)

    def next_examples(self, stream, n: int) -> tuple[list[tuple], int]:
        """The stream's next `n` readable examples as (encoded, image, task), and the stream position after
        them; an unreadable image is skipped (and counted once)."""
        n_soft = self.recipe.soft_prompt.tokens
        encoded, images, tasks = [], [], []
        failures_in_a_row, position = 0, None
        while len(images) < n:
            k, rec = next(stream)
            position = k + 1
            try:
                images.append(load_image(rec["image_path"], self.recipe.data.max_pixels))
                failures_in_a_row = 0
            except ImageError as e:
                if str(e) not in self.skipped:  # an image, not each of its captions/questions
                    self.skipped.append(str(e))
                failures_in_a_row += 1
                if failures_in_a_row >= MAX_BAD_IN_A_ROW:
                    raise DataError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row (last: {e}); "
                                    "check the image folder before training") from e
                continue
            encoded.append(self.vlm.encode(rec["instruction"], rec["input"], rec["output"], n_soft))
            tasks.append(self.mixture.task_of(k))
        return list(zip(encoded, images, tasks)), position

    def collate_examples(self, examples: list[tuple]) -> dict:
        encoded, images, tasks = (list(x) for x in zip(*examples))
        return {**self.collate(encoded, images), "tasks": tasks}

    def step_batches(self, stream) -> dict:
        """One optimizer step's data. Every rank draws the same global examples (batch_size x grad_accum),
        sorted by length when train.group_by_length (less padding), cut into micro-batches; each rank
        collates its share of each. `answer_tokens` (global) turns summed losses into the step's mean."""
        t = self.recipe.train
        examples, position = self.next_examples(stream, t.batch_size * t.grad_accum)
        if t.group_by_length:  # a stable sort: equal lengths keep the stream's order
            examples = sorted(examples, key=lambda e: len(e[0].input_ids))
        micro = [examples[i:i + t.batch_size] for i in range(0, len(examples), t.batch_size)]
        return {"batches": [self.collate_examples(self.ranks.share(m)) for m in micro], "position": position,
                "answer_tokens": sum(label != -100 for e in examples for label in e[0].labels[1:]),
                "tokens": sum(len(e[0].input_ids) for e in examples)}

    def collate(self, encoded, images) -> dict:
        n = max(len(e.input_ids) for e in encoded)
        pad = self.vlm.tokenizer.pad_token_id or 0
        ids = torch.tensor([e.input_ids + [pad] * (n - len(e.input_ids)) for e in encoded])
        m = max(len(e.labels) for e in encoded)  # an encoder-decoder's labels are the answer alone
        labels = torch.tensor([e.labels + [-100] * (m - len(e.labels)) for e in encoded])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (n - len(e.input_ids)) for e in encoded])
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": self.vlm.pixels(images)}
        instruction = self.vlm.instruction_inputs([e.instruction for e in encoded])  # InstructBLIP's Q-Former
        if instruction is not None:
            batch["qformer_input_ids"], batch["qformer_attention_mask"] = instruction
        if getattr(self, "graphs", None) is not None:
            batch = self._static(batch)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _static(self, batch: dict) -> dict:
        """A batch for CUDA graphs: lengths padded to a few shapes, answer positions as indices (VLM.loss
        reads nothing back from the device then), every row's placeholders checked here on the host."""
        from mmagent.train.graph_step import ANSWERS_TO, PAD_TO
        ids, labels = batch["input_ids"], batch["labels"]
        counts = (ids == self.vlm.family.image_token_id(self.vlm.base_model)).sum(1)
        if bool((counts != counts[0]).any()):
            raise DataError(f"image placeholders per example differ ({counts.tolist()}); build prompts with VLM.encode")
        pad = -ids.shape[1] % PAD_TO
        batch["input_ids"] = torch.nn.functional.pad(ids, (0, pad), value=self.vlm.tokenizer.pad_token_id or 0)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, pad))
        batch["labels"] = labels = torch.nn.functional.pad(labels, (0, pad), value=-100)
        rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
        extra = -len(rows) % ANSWERS_TO
        batch["answer_index"] = torch.cat([rows * labels.shape[1] + cols, torch.zeros(extra, dtype=torch.long)])
        batch["answer_targets"] = torch.cat([labels[rows, cols + 1], torch.full((extra,), -100)])
        if "qformer_input_ids" in batch:  # the instruction's length too
            q = -batch["qformer_input_ids"].shape[1] % 8
            batch["qformer_input_ids"] = torch.nn.functional.pad(batch["qformer_input_ids"], (0, q),
                                                                 value=self.vlm.qformer_tokenizer.pad_token_id or 0)
            batch["qformer_attention_mask"] = torch.nn.functional.pad(batch["qformer_attention_mask"], (0, q))
        return batch

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision != "fp32")

    def train_step(self, steps) -> float:
        """One optimizer step on the next prepared step of `steps` (step_batches' dicts); its mean loss."""
        step = next(steps)
        total, per_task = 0.0, {}
        batches = step["batches"]
        # DDP averages gradients over ranks: times world / global count = the step's token mean
        scale = self.ranks.world / max(1, step["answer_tokens"])
        with self._lora_in_compute_dtype():
            for i, batch in enumerate(batches):
                done = self._graphed(batch, scale, first=i == 0)
                if done is not None:  # replayed as a CUDA graph
                    tokens, loss = done
                else:
                    with self.ranks.no_sync(self.forward, i == len(batches) - 1):
                        with self.autocast():
                            tokens = self.forward(batch, self.loss_vocab)
                            loss = tokens.sum() * scale
                        loss.backward()
                total += loss.item() / self.ranks.world
                add_task_losses(per_task, tokens.detach(), batch)
        self.ranks.average_grads(list(self.params.values()))
        total = self._agree(total, per_task)
        self.position, self.step_tokens = step["position"], step["tokens"]
        self.task_loss = {task: s / n for task, (s, n) in sorted(per_task.items()) if n}
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _agree(self, loss: float, per_task: dict) -> float:
        """Several processes: sum the step's loss and per-task sums over ranks, and stop together when any
        rank was signalled. One all-reduce a step; nothing on one process."""
        if self.ranks.world == 1:
            return loss
        names = self.mixture.names
        got = self.ranks.sum([loss, float(self.stop_signal or 0)] + [per_task.get(n, (0.0, 0))[0] for n in names]
                             + [per_task.get(n, (0.0, 0))[1] for n in names])
        if got[1] and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        per_task.clear()
        per_task.update({n: (got[2 + i], int(got[2 + len(names) + i])) for i, n in enumerate(names)})
        return got[0]

    def train(self) -> None:
        self.vlm.model.train()
        stream = self.mixture.examples(self.position)
        steps = prefetched(lambda: self.step_batches(stream))
        try:
            self._train_loop(steps)
        finally:
            steps.close()
        if self.skipped:
            self.console.print(f"[yellow]skipped the examples of {len(self.skipped)} unreadable image(s); "
                               f"first: {self.skipped[0]}")
        if self.stop_signal is not None:
            self._stop()

    def _train_loop(self, steps) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        t = self.recipe.train
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.3f} lr {task.fields[lr]:.2e} {task.fields[sps]:.0f} samples/s"),
                   TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress, self._stop_on_signals():
            bar = progress.add_task(f"train {self.recipe.run.name}", total=t.steps, completed=self.step,
                                    loss=float("nan"), lr=0.0, sps=0.0)
            while self.step < t.steps:
                start = time.perf_counter()
                loss = self.train_step(steps)
                self.step += 1
                seconds = time.perf_counter() - start
                sps = t.batch_size * t.grad_accum / seconds
                lr = self.scheduler.get_last_lr()[0]
                progress.update(bar, completed=self.step, loss=loss, lr=lr, sps=sps)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self._log({"step": self.step, "loss": loss, "lr": lr, "samples_per_s": sps,
                               "tokens_per_s": self.step_tokens / seconds, "task_loss": self.task_loss})
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.steps:
                    self.save_checkpoint()
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    self.ranks.gather_weights(self.forward)  # FSDP: whole weights for rank 0's forwards
                    if self.ranks.main:  # rank 0 evaluates, the others wait for it
                        self._log({"step": self.step, "eval": self.evaluate()})
                    self.ranks.release_weights(self.forward)
                    self.ranks.barrier()
                if self.stop_signal is not None:
                    break

    @contextmanager
    def _stop_on_signals(self):
        """SIGINT (Ctrl-C) or SIGTERM while training: finish the current step, then _stop() (a second signal
        stops at once; checkpoints are written atomically, so that loses only the steps since the last one)."""
        self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

    def _stop(self) -> None:
        """Checkpoint the step training stopped at, let go of the run directory, say how to go on."""
        if self.step not in {step for step, _ in checkpoints(self.run_dir)}:
            self.save_checkpoint()
        self.close()
        name = signal.Signals(self.stop_signal).name
        raise TrainingInterrupted(self.stop_signal, (
            f"{name}: training stopped at step {self.step}/{self.recipe.train.steps}; checkpoint "
            f"`{self.run_dir / 'checkpoints' / f'step-{self.step}'}` written. Continue with "
            f"`mmagent train {self.recipe.source} --resume` (and the same key=value overrides)"))

    def save_checkpoint(self) -> None:
        trainables, optimizer = self.params, self.optimizer
        if self.ranks.sharded:  # every rank sends its shards: whole tensors on rank 0, the one-process layout
            trainables, optimizer = gather_state(self.forward, self.params, self.optimizer)
        if self.ranks.main:  # replicated (or gathered) state: rank 0's checkpoint is every rank's
            save_checkpoint(self.run_dir, self.step, trainables, optimizer, self.scheduler,
                            {"example": self.position, "skipped": list(self.skipped), "world_size": self.ranks.world})
        if self.ranks.sharded:
            self.ranks.barrier()  # every rank agrees on which checkpoints exist (_stop reads them)

    # ---- evaluation and output -----------------------------------------------------------------
    def evaluate(self, with_adapter: bool = True, split: str = "eval", candidates: dict | None = None) -> dict:
        sp = self.soft_prompt() if (self.soft_prompt is not None and with_adapter) else None
        bare = not with_adapter and hasattr(self.vlm.model, "disable_adapter")
        eager = torch.compiler.set_stance("force_eager") if self.recipe.train.compile else nullcontext()
        # bf16: frozen parts in bf16 feed trained ones in fp32 (full fine-tuning of some parts); autocast joins
        # them, as in training (LoRA layers cast their own inputs)
        mixed = self.autocast() if self.precision == "bf16" else nullcontext()
        with torch.random.fork_rng(devices=[]), (self.vlm.model.disable_adapter() if bare else nullcontext()), \
                eager, mixed:
            self.vlm.model.eval()
            result = evaluate_tasks(self.vlm, self.recipe.tasks, self.eval_records[split], sp,
                                    self.recipe.train.max_new_tokens, self.device, self.recipe.data.max_pixels,
                                    self.recipe.run.seed, candidates)
            self.vlm.model.train()
        return result

    def evaluate_base(self) -> tuple[dict, str]:
        """The base without the adapter, scored fairly: VQA-like tasks rank the training answers (the base
        was never taught to answer in that form), captions are generated as the base was trained to."""
        r = self.recipe
        candidates = {t.name: answer_vocabulary(self.train_records.get(t.name) or task_records(t, r.data, "train"))
                      for t in r.tasks if t.kind != "caption"}
        n = {name: len(c) for name, c in candidates.items()}
        protocol = (f"the base without the adapter, on up to {BASE_EVAL} held-out examples a task; " + "; ".join(
            f"{name} ranked over the {k} most common training answers (likelihood of answer + end token)"
            for name, k in n.items()) + ("; captions generated" if len(n) < len(self.recipe.tasks) else ""))
        return self.evaluate(False, "base", candidates), protocol

    def base_stage1_results(self) -> dict:
        """What the base's own build measured (builtin bases record their stage-1 results)."""
        meta = Path(self.base.path) / "mmagent_base.json"
        return json.loads(meta.read_text()).get("results", {}) if meta.is_file() else {}

    def _log(self, entry: dict) -> None:
        if not self.ranks.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.board is not None:
            self.board.log(entry)

    def _truncate_metrics(self, step: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if path.exists() and self.ranks.main:
            keep = [e for e in read_metrics(path) if e["step"] <= step]
            atomic_write_bytes(path, "".join(json.dumps(e) + "\n" for e in keep).encode())

    def finish(self) -> dict:
        """Evaluate adapter and base, write the adapter (or the full model) and the results."""
        r = self.recipe
        if not self.ranks.main:  # rank 0 evaluates and writes the run; the others wait for it
            self.ranks.gather_weights(self.forward)  # FSDP: the others take part in rank 0's all-gathers
            self.ranks.release_weights(self.forward)
            self.ranks.full_model_state(self.forward, trained_only=r.train.method == "lora")
            self.ranks.barrier()
            self.close()
            return {"steps": self.step}
        self.ranks.gather_weights(self.forward)  # FSDP: whole weights for the evaluation (rank 0 alone)
        results = {"adapter": self.evaluate(True)}
        if "comp" in self.eval_records:
            results["adapter_compositional"] = self.evaluate(True, "comp")
        if r.train.method == "lora" and r.train.eval_base:
            results["base"], results["base_protocol"] = self.evaluate_base()
        results["base_stage1"] = self.base_stage1_results()
        if self.vision_align:
            results["contrast"] = self.vision_align
        results["skipped_images"] = len(self.skipped)  # distinct images
        results["steps"] = self.step  # what --resume calls finished (mmagent.train.rundir)
        results["trainable"] = {name: [n, total] for name, n, total in
                                ad.trainable_table(self.vlm.model, self.vlm.family, self.soft_prompt)}
        self.ranks.release_weights(self.forward)
        full = self.ranks.full_model_state(self.forward, trained_only=r.train.method == "lora")  # FSDP: whole tensors
        self._log({"step": self.step, "eval": results["adapter"]})  # the evaluation curve's last point
        meta = {"task": r.adapter_name, "tasks": [t.name for t in r.tasks], "base_ref": self.base.ref,
                "kinds": sorted({t.kind for t in r.tasks}),
                "instructions": {t.kind: t.instruction or default_instruction(t.kind) for t in r.tasks},
                "base_fingerprint": self.base.fingerprint, "family": self.vlm.family.name,
                "parts": {p: getattr(self.lora, p) for p in ad.PARTS if getattr(self.lora, p)},
                "soft_prompt_tokens": r.soft_prompt.tokens, "system": r.model.system}
        if r.train.method == "lora":
            ad.save_adapter(self.vlm.model, r.adapter_name, self.run_dir / "adapters" / r.adapter_name,
                            self.soft_prompt, meta, state_dict=full)
        else:
            self.save_full_model(full)
        atomic_write_json(self.run_dir / "recipe.json", r.to_dict())
        atomic_write_json(self.run_dir / "base.json", {"ref": self.base.ref, "fingerprint": self.base.fingerprint,
                                                       "path": str(self.base.path)})
        atomic_write_json(self.run_dir / "results.json", results)
        write_report(self.run_dir, results)
        self.close()
        self.ranks.barrier()
        return results

    def save_full_model(self, state: dict | None = None) -> None:
        """`state`: the model's whole tensors when its own are sharded (Ranks.full_model_state)."""
        from mmagent.files import atomic_dir
        with atomic_dir(self.run_dir / "model", force=True) as tmp:
            if state is None:
                self.vlm.model.save_pretrained(tmp)
            else:
                self.vlm.model.save_pretrained(tmp, state_dict={k: v for k, v in state.items()
                                                                if k != "soft_prompt.vectors"})
            self.vlm.tokenizer.save_pretrained(tmp)
            self.vlm.image_processor.save_pretrained(tmp)

    def run(self) -> dict:
        try:
            self.setup()
            self.train()
            return self.finish()
        finally:
            self.close()
