"""Training on several processes without GPUs: accelerate's launcher, 2 CPU processes on gloo.

The distributed logic that needs no GPU: each rank takes its share of the same global step, rank 0 alone
writes the run directory, checkpoints have one layout whatever the number of processes, and a run resumes
on another number of processes where it stopped. A base without dropout makes 1 and 2 processes compute
the same steps, so they are compared to float rounding, not within noise.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SMALL_DATA
from mmagent.train.distributed import Ranks
from mmagent.train.report import read_metrics


def test_each_rank_takes_its_contiguous_share_of_the_global_batch():
    ranks = Ranks()
    shares = []
    for rank in range(4):
        ranks.world, ranks.rank = 4, rank
        shares.append(ranks.share(list(range(8))))
    assert shares == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="multiple of 4"):
        ranks.check_batch(6)


@pytest.fixture(scope="module")
def still_base(tmp_path_factory, mmagent_cache):
    """The builtin tiny architecture with every dropout off, saved as an HF directory."""
    from mmagent.train.builtin import init_base
    model, tok, proc = init_base("tiny", seed=0)
    cfg = model.config
    cfg.qformer_config.hidden_dropout_prob = cfg.qformer_config.attention_probs_dropout_prob = 0.0
    cfg.vision_config.attention_dropout = cfg.text_config.attention_dropout = 0.0
    out = tmp_path_factory.mktemp("still-base")
    for part in (model, tok, proc):
        part.save_pretrained(out)
    return out


def train(run, base, *extra, gpus=1):
    cmd = [sys.executable, str(ROOT / "cli.py"), "train", str(ROOT / "recipes/vqa.toml"), f'run.output_dir="{run}"',
           f'model.base="{base}"', *SMALL_DATA, "data.image_size=64", "train.batch_size=4", "train.steps=4",
           "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=2", "lora.dropout=0.0",
           "tasks.0.max_eval=2", "train.eval_base=false", "train.baselines=[]", *extra]
    if gpus > 1:
        cmd.append(f"--gpus={gpus}")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def same_weights(x: dict, y: dict) -> bool:
    """Equal up to float order: AdamW's normalised update turns last-bit gradient differences into ~1e-5
    (a wrong share moves lora_B, which starts at zero, in another direction altogether)."""
    return x.keys() == y.keys() and all((x[k] - y[k]).norm() <= 1e-2 * y[k].norm() + 1e-6 for k in x)


def losses(run):
    return {m["step"]: m["loss"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m}


@pytest.fixture(scope="module")
def one(tmp_path_factory, still_base):
    """The reference: the run on one process."""
    run = tmp_path_factory.mktemp("one-process") / "one"
    train(run, still_base)
    return run


@pytest.mark.slow
def test_two_processes_train_the_same_steps_and_resume_on_one(tmp_path, still_base, one):
    two = tmp_path / "two"
    out = train(two, still_base, gpus=2)
    assert "launching:" in out and out.count("run directory:") == 1  # one voice: rank 0's
    # rank 0 alone writes: every step logged once, one checkpoint layout, the same steps as one process
    assert [m["step"] for m in read_metrics(two / "metrics.jsonl") if "loss" in m] == [1, 2, 3, 4]
    a, b = losses(one), losses(two)
    assert all(abs(a[s] - b[s]) < 1e-4 * abs(a[s]) for s in a), (a, b)
    ck1, ck2 = one / "checkpoints/step-2", two / "checkpoints/step-2"
    assert sorted(p.name for p in ck1.iterdir()) == sorted(p.name for p in ck2.iterdir())
    assert json.loads((ck2 / "state.json").read_text())["position"]["world_size"] == 2
    w1, w2 = load_file(ck1 / "trainable.safetensors"), load_file(ck2 / "trainable.safetensors")
    assert same_weights(w1, w2)

    # a 2-process run stopped after its step-2 checkpoint goes on in one process along the same curve
    cut = tmp_path / "cut"
    shutil.copytree(two, cut, ignore=shutil.ignore_patterns("adapters", "results.json", "report.md", ".lock"))
    train(cut, still_base, "--resume")
    c = losses(cut)
    assert sorted(c) == [1, 2, 3, 4] and all(abs(c[s] - b[s]) < 1e-4 * abs(b[s]) for s in b), (b, c)
    adapter = "adapters/vqa/adapter_model.safetensors"
    assert same_weights(load_file(cut / adapter), load_file(two / adapter))


@pytest.mark.slow
def test_gradients_averaged_by_hand_as_cuda_graphs_need_train_the_same_steps(tmp_path, still_base, one):
    """With train.cuda_graphs on several processes there is no DDP wrapper (its hooks cannot run inside a
    captured backward): the trainer averages the gradients itself after each step. On CPUs the graphs stay
    off but that averaging runs, and must give the one-process steps."""
    two = tmp_path / "two-manual"
    out = train(two, still_base, "train.cuda_graphs=true", gpus=2)
    assert "training without CUDA graphs" in out  # no CUDA here: the eager step, with the manual averaging
    a, b = losses(one), losses(two)
    assert sorted(b) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) < 1e-4 * abs(a[s]) for s in a), (a, b)
    adapter = "adapters/vqa/adapter_model.safetensors"
    assert same_weights(load_file(one / adapter), load_file(two / adapter))


def _average_on(rank: int, port: int, result) -> None:
    import os
    import torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from mmagent.train import distributed
    distributed.BUCKET = 5  # several flat all-reduces: a (6), then never + extra (2 + 3)
    try:
        ranks = Ranks.__new__(Ranks)
        ranks.world, ranks.rank, ranks.manual = 2, rank, True
        a = torch.zeros(2, 3, requires_grad=True)
        b = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
        never = torch.zeros(2, requires_grad=True)  # no gradient reached it on rank 0
        extra = torch.zeros(3, requires_grad=True)
        extra.grad = torch.full_like(extra, 3.0 * rank)
        a.grad = torch.full_like(a, rank + 1.0)
        b.grad = torch.full_like(b, 2.0 * rank)
        if rank:
            never.grad = torch.full_like(never, 4.0)
        ranks.average_grads([a, b, never, extra])
        result[rank] = (a.grad.tolist(), b.grad.float().tolist(), never.grad.tolist(), extra.grad.tolist())
    finally:
        torch.distributed.destroy_process_group()


def test_gradient_buckets_keep_order_and_size():
    from mmagent.train.distributed import buckets
    import torch
    ts = [torch.zeros(n) for n in (3, 4, 9, 1, 2)]
    got = buckets(ts, 7)
    assert [[t.numel() for t in b] for b in got] == [[3, 4], [9], [1, 2]]
    assert [t for b in got for t in b] == ts and buckets([], 7) == []


def test_gradients_averaged_by_hand_are_the_mean_over_ranks_in_every_dtype():
    import torch.multiprocessing as mp
    from mmagent.train.distributed import free_port
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_average_on, args=(free_port(), result), nprocs=2)
        got = dict(result)
    assert got[0] == got[1] == ([[1.5] * 3] * 2, [1.0] * 4, [2.0] * 2, [1.5] * 3)


# ---- FSDP (train.sharding = "fsdp"): sharded weights, gradients and optimizer state; one checkpoint layout ----

def same_layout(ck1, ck2) -> None:
    """Two checkpoints in one layout: the same files, trained tensors (names, shapes, dtypes), optimizer
    tensors under the same indices and the same optimizer groups."""
    assert sorted(p.name for p in ck1.iterdir()) == sorted(p.name for p in ck2.iterdir())
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        a, b = load_file(ck1 / name), load_file(ck2 / name)
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}, name
    s1, s2 = (json.loads((ck / "state.json").read_text())["optimizer"] for ck in (ck1, ck2))
    assert s1["param_groups"] == s2["param_groups"] and s1["scalars"].keys() == s2["scalars"].keys()


def agree(a: dict, b: dict, tol: float = 1e-4) -> bool:
    return sorted(a) == sorted(b) and all(abs(a[s] - b[s]) < tol * abs(a[s]) for s in a)


def close_in_bf16(x: dict, y: dict, lr: float, steps: int = 4) -> bool:
    """Equal as two bf16 runs can be: each element within bf16 rounding plus two AdamW steps' worth of lr a
    step (a parameter whose gradient is noise, such as an attention key's bias, takes steps of about lr in
    either direction). A misplaced shard or a stale tensor is off by the weights' own size instead."""
    return x.keys() == y.keys() and all(
        bool(((x[k].float() - y[k].float()).abs() <= y[k].float().abs() * 2 ** -7 + 2 * lr * steps).all()) for k in x)


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_the_lora_steps_of_one_and_resumes_on_one(tmp_path, still_base, one):
    two = tmp_path / "fsdp"
    out = train(two, still_base, "train.sharding=fsdp", "train.eval_every=2", gpus=2)  # rank 0 evaluates alone
    # units: the tiny base's 4 LLM layers, 2 vision layers, the Q-Former whole, the root
    assert out.count("run directory:") == 1 and "8 FSDP units over 2 processes" in out, out[-3000:]
    assert agree(losses(one), losses(two)), (losses(one), losses(two))
    assert [m["step"] for m in read_metrics(two / "metrics.jsonl") if "eval" in m] == [2, 4]
    same_layout(one / "checkpoints/step-2", two / "checkpoints/step-2")
    assert same_weights(load_file(one / "checkpoints/step-2/trainable.safetensors"),
                        load_file(two / "checkpoints/step-2/trainable.safetensors"))
    adapter = "adapters/vqa/adapter_model.safetensors"  # whole tensors, as one process saves them
    assert same_weights(load_file(one / adapter), load_file(two / adapter))

    cut = tmp_path / "cut"  # stopped after its step-2 checkpoint, resumed on one process: the same curve
    shutil.copytree(two, cut, ignore=shutil.ignore_patterns("adapters", "results.json", "report.md", ".lock"))
    out = train(cut, still_base, "train.sharding=fsdp", "--resume")
    assert "nothing to shard" in out
    assert agree(losses(two), losses(cut)), (losses(two), losses(cut))
    assert same_weights(load_file(cut / adapter), load_file(two / adapter))


@pytest.mark.slow
def test_fsdp_full_fine_tuning_trains_the_steps_of_one_process_and_resumes_its_checkpoint(tmp_path, still_base):
    """Full fine-tuning of the bridge and the LLM, every weight in bf16 (train.precision = bf16-true, what a
    7B's full fine-tuning runs in); the vision encoder's units stay frozen. A one-process checkpoint goes on
    sharded over two processes; the saved model holds whole tensors."""
    full = ("train.method=full", 'train.parts=["bridge","llm"]', "train.lr=1e-4", "train.precision=bf16-true")
    one_full, two = tmp_path / "one-full", tmp_path / "fsdp-full"
    train(one_full, still_base, *full)
    train(two, still_base, *full, "train.sharding=fsdp", gpus=2)
    assert agree(losses(one_full), losses(two)), (losses(one_full), losses(two))
    same_layout(one_full / "checkpoints/step-2", two / "checkpoints/step-2")
    model = "model/model.safetensors"
    assert close_in_bf16(load_file(one_full / model), load_file(two / model), lr=1e-4)

    cut = tmp_path / "cut-full"  # the one-process checkpoint resumed on two sharded processes
    shutil.copytree(one_full, cut, ignore=shutil.ignore_patterns("model", "results.json", "report.md", ".lock"))
    train(cut, still_base, *full, "train.sharding=fsdp", "--resume", gpus=2)
    assert agree(losses(one_full), losses(cut)), (losses(one_full), losses(cut))
    assert close_in_bf16(load_file(cut / model), load_file(one_full / model), lr=1e-4)


@pytest.mark.slow
def test_fsdp_units_of_frozen_bf16_and_trained_fp32_weights_train_the_steps_of_one_process(tmp_path, still_base):
    """LoRA in train.precision = bf16: every LLM and vision unit holds the frozen base in bf16 beside the
    trained fp32 LoRA weights (FSDP2 gathers mixed dtypes; gradients and AdamW state stay fp32)."""
    bf16 = ("train.precision=bf16", "lora.vision=[\"preset\"]", "train.lr=1e-4")
    one_bf16, two = tmp_path / "one-bf16", tmp_path / "fsdp-bf16"
    train(one_bf16, still_base, *bf16)
    train(two, still_base, *bf16, "train.sharding=fsdp", gpus=2)
    assert agree(losses(one_bf16), losses(two), 1e-3), (losses(one_bf16), losses(two))
    weights = load_file(two / "checkpoints/step-2/trainable.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}
    adapter = "adapters/vqa/adapter_model.safetensors"
    assert close_in_bf16(load_file(one_bf16 / adapter), load_file(two / adapter), lr=1e-4)


def test_fsdp_is_refused_with_cuda_graphs_naming_the_fix():
    from mmagent.train.recipe import RecipeError, load_recipe
    with pytest.raises(RecipeError, match="train.cuda_graphs = false"):
        load_recipe(ROOT / "recipes/vqa.toml", ["train.sharding=\"fsdp\"", "train.cuda_graphs=true"])
    with pytest.raises(RecipeError, match="expected none or fsdp"):
        load_recipe(ROOT / "recipes/vqa.toml", ["train.sharding=\"zero3\""])


@pytest.fixture(scope="module")
def still_t5(tmp_path_factory):
    """BLIP-2 + a tiny Flan-T5 (an encoder-decoder LLM) with every dropout off."""
    from tiny_checkpoints import blip2_t5
    base = blip2_t5(tmp_path_factory.mktemp("t5") / "blip2-flan-t5-tiny")
    cfg = json.loads((base / "config.json").read_text())
    cfg["text_config"]["dropout_rate"] = 0.0
    cfg["qformer_config"]["hidden_dropout_prob"] = cfg["qformer_config"]["attention_probs_dropout_prob"] = 0.0
    cfg["vision_config"]["attention_dropout"] = 0.0
    (base / "config.json").write_text(json.dumps(cfg))
    return base


@pytest.mark.slow
def test_fsdp_shards_an_encoder_decoder_llm_and_trains_the_steps_of_one_process(tmp_path, still_t5):
    """Flan-T5's encoder and decoder blocks are units too; the seq2seq loss trains as on one process."""
    one_t5, two = tmp_path / "one-t5", tmp_path / "fsdp-t5"
    t5 = ("train.steps=3", "train.checkpoint_every=0", 'lora.llm=["preset"]')  # T5's q, v
    train(one_t5, still_t5, *t5)
    out = train(two, still_t5, *t5, "train.sharding=fsdp", gpus=2)
    assert "8 FSDP units over 2 processes" in out, out[-3000:]  # 2 + 2 T5 blocks, 2 ViT layers, Q-Former, root
    assert agree(losses(one_t5), losses(two)), (losses(one_t5), losses(two))
    adapter = "adapters/vqa/adapter_model.safetensors"
    assert same_weights(load_file(one_t5 / adapter), load_file(two / adapter))
