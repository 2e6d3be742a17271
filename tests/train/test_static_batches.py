"""Static batches (what a CUDA-graph step needs, train.cuda_graphs) compute what the ordinary batches do:
the same per-token losses and gradients, with padded lengths, answer positions as indices and no attention
mask for the decoder. The capture itself needs a GPU (bench/train_7b.py measures it there)."""
import pytest
import torch

from tiny_checkpoints import RECIPE, instructblip, llava
from mmagent.train.fused import fuse_rms_norms
from mmagent.train.recipe import load_recipe
from mmagent.train.trainer import Trainer


def trainer_for(tmp, maker, *overrides):
    base = maker(tmp / "base")
    recipe = tmp / "r.toml"
    recipe.write_text(RECIPE.format(name="vqa", out=tmp / "run", base=base))
    trainer = Trainer(load_recipe(recipe, ["train.batch_size=6", *overrides]))
    trainer.setup()
    return trainer


def losses_and_grads(trainer, batch):
    trainer.vlm.model.zero_grad(set_to_none=True)
    tokens = trainer.forward(batch, trainer.loss_vocab)
    tokens.sum().backward()
    return tokens.detach(), {n: p.grad.clone() for n, p in trainer.params.items()}


@pytest.mark.parametrize("maker", [instructblip, llava])
def test_static_batch_gives_the_same_losses_and_gradients(tmp_path, maker):
    trainer = trainer_for(tmp_path, maker)
    try:
        trainer.vlm.model.eval()  # no dropout: both passes see the same function
        stream = trainer.mixture.examples(0)
        batch = trainer.step_batches(stream)["batches"][0]
        lengths = batch["attention_mask"].sum(1)
        assert lengths.min() < lengths.max(), "the check needs padded rows"
        tokens, grads = losses_and_grads(trainer, batch)
        static = trainer._static(dict(batch))
        assert static["input_ids"].shape[1] % 32 == 0 and static["answer_index"].shape[0] % 64 == 0
        if "qformer_input_ids" in static:
            assert static["qformer_input_ids"].shape[1] % 8 == 0
        static_tokens, static_grads = losses_and_grads(trainer, static)
        n = len(tokens)
        assert torch.allclose(static_tokens[:n], tokens, atol=1e-5)
        assert static_tokens[n:].abs().sum() == 0  # padding entries cost nothing
        for name, g in grads.items():
            assert torch.allclose(static_grads[name], g, atol=1e-6, rtol=1e-4), name
        # a broken placeholder count is refused on the host, before any device work
        static_bad = dict(batch)
        static_bad["input_ids"] = batch["input_ids"].clone()
        image_id = trainer.vlm.family.image_token_id(trainer.vlm.base_model)
        static_bad["input_ids"][0, (static_bad["input_ids"][0] == image_id).nonzero()[0]] = 1
        with pytest.raises(ValueError, match="placeholders"):
            trainer._static(static_bad)
    finally:
        trainer.close()


def test_cuda_graphs_without_cuda_train_eagerly_and_say_so(tmp_path, capsys):
    trainer = trainer_for(tmp_path, instructblip, "train.cuda_graphs=true", "train.fused_ops=true")
    try:
        assert trainer.graphs is None
        from mmagent.train.trainer import prefetched
        source = prefetched(lambda: trainer.step_batches(trainer.mixture.examples(0)))
        loss = trainer.train_step(source)
        source.close()
        assert loss == loss and loss > 0
        assert all(m.cast_input_dtype_enabled for m in trainer._lora_layers)  # restored after the step
    finally:
        trainer.close()
    assert "no CUDA device" in capsys.readouterr().out


def test_fused_rms_norm_matches_transformers(tmp_path):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
        norm.weight.data.normal_(1.0, 0.1)
        x = (torch.randn(3, 7, 64) * 3).to(dtype)
        eager = norm(x)
        assert fuse_rms_norms(torch.nn.Sequential(norm)) == 1
        fused = norm(x)
        assert fused.dtype == eager.dtype
        assert (fused.float() - eager.float()).abs().max() <= tol * eager.float().abs().max()


def test_fused_swiglu_matches_transformers_forward_and_backward():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from mmagent.train.fused import fuse_swiglu
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48))
    x = torch.randn(2, 5, 32, requires_grad=True)
    eager = mlp(x)
    (want,) = torch.autograd.grad(eager.square().sum(), x)
    assert fuse_swiglu(torch.nn.Sequential(mlp)) == 1 and fuse_swiglu(mlp) == 0  # once only
    fused = mlp(x)
    (got,) = torch.autograd.grad(fused.square().sum(), x)
    assert mlp.forward is not mlp._mm_eager_forward
    torch.testing.assert_close(fused, eager)
    torch.testing.assert_close(got, want)
    gelu = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="gelu"))
    assert fuse_swiglu(gelu) == 0  # another activation keeps its own forward


def test_graph_gradients_accumulate_over_micro_batches_with_eager_ones_between():
    """GraphedStep's bookkeeping (the capture needs CUDA; this part is plain tensors): the first micro-batch's
    graph gradients replace .grad, later ones add, and what an eager micro-batch put in .grad is kept."""
    from mmagent.train.graph_step import GraphedStep
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    step = object.__new__(GraphedStep)
    step.params, step.grads = params, None
    params[0].grad = torch.full((3,), 9.0)  # last step's leftovers: the first micro-batch replaces them
    step._accumulate([torch.ones(3), None], first=True)
    assert params[0].grad.tolist() == [1, 1, 1] and params[1].grad.tolist() == [0, 0]
    step._accumulate([torch.ones(3), torch.ones(2)], first=False)
    assert params[0].grad.tolist() == [2, 2, 2] and params[1].grad.tolist() == [1, 1]
    params[1].grad = params[1].grad + 5  # an eager micro-batch's backward made a new tensor
    step._accumulate([torch.ones(3), torch.ones(2)], first=False)
    assert params[0].grad.tolist() == [3, 3, 3] and params[1].grad.tolist() == [7, 7]
