"""BLIP-2's first stage for a base trained from scratch: the ViT and the Q-Former learn to see from
image-text contrast (ITC) and image-text matching with hard negatives (ITM), with no pass through the LLM.

Captions say what an image shows; contrast against the other captions of a batch, and matching against the
most confusable one, make the vision side tell colours, shapes and places apart long before a language
model could learn to use them. The trained ViT, query tokens and Q-Former are written back into the
BLIP-2 model; the Q-Former's text branch (embeddings, text feed-forward, projections, ITM head) is
stage-1 scaffolding and is dropped, as BLIP-2 drops it for its second stage.
"""
from __future__ import annotations

import copy
import random
import time
import torch
import torch.nn.functional as F

from mmagent.images import load_image


MAX_TEXT_TOKENS = 48


def retrieval_model(model, vocab_size: int):
    """A Blip2ForImageTextRetrieval sharing `model`'s ViT and query tokens, with a Q-Former that has the
    text branch (initialised from `model`'s Q-Former where the two coincide)."""
    from transformers import Blip2ForImageTextRetrieval
    cfg = copy.deepcopy(model.config)
    cfg.qformer_config.use_qformer_text_input = True
    cfg.qformer_config.vocab_size = vocab_size
    cfg.image_text_hidden_size = cfg.qformer_config.hidden_size
    cfg.image_token_index = None  # the retrieval model reads plain text, no image placeholders
    retrieval = Blip2ForImageTextRetrieval(cfg)
    retrieval.vision_model = model.vision_model
    retrieval.query_tokens = model.query_tokens
    retrieval.qformer.load_state_dict(model.qformer.state_dict(), strict=False)
    return retrieval


def write_back(retrieval, model) -> None:
    """Copy the trained Q-Former's query branch into `model` (the ViT and query tokens are shared)."""
    own = model.qformer.state_dict()
    model.qformer.load_state_dict({k: v for k, v in retrieval.qformer.state_dict().items() if k in own})


class CaptionVocab:
    """The captions' own token ids renumbered 0..n (0 = padding, 1 = CLS): the text branch is scaffolding,
    so it gets an embedding row per token the captions use, not one per token of a 49k vocabulary."""

    def __init__(self, tokenizer, captions: list[str], max_tokens: int):
        self.tok, self.max_tokens = tokenizer, max_tokens
        self.ids = {c: tokenizer(c, add_special_tokens=False)["input_ids"][:max_tokens] for c in set(captions)}
        used = sorted({i for ids in self.ids.values() for i in ids})
        self.index = {t: k + 2 for k, t in enumerate(used)}

    def __len__(self) -> int:
        return len(self.index) + 2

    def encode(self, caption: str) -> list[int]:
        if caption not in self.ids:
            self.ids[caption] = self.tok(caption, add_special_tokens=False)["input_ids"][: self.max_tokens]
        return [1] + [self.index.get(t, 0) for t in self.ids[caption]]


class Contrast:
    """One ITC + ITM step on a batch of (image, caption) pairs."""

    def __init__(self, retrieval, vocab: CaptionVocab):
        self.m, self.vocab = retrieval, vocab
        self.log_temp = torch.nn.Parameter(torch.tensor(0.07).log())

    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids with a leading CLS whose output is the caption's embedding."""
        ids = [self.vocab.encode(c) for c in captions]
        n = max(map(len, ids))
        input_ids = torch.tensor([x + [0] * (n - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
        return input_ids, mask

    def image_side(self, pixel_values):
        image_embeds = self.m.vision_model(pixel_values=pixel_values).last_hidden_state
        queries = self.m.query_tokens.expand(len(pixel_values), -1, -1)
        out = self.m.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
        return image_embeds, F.normalize(self.m.vision_projection(out), dim=-1)  # (B, Q, D)

    def text_side(self, input_ids, mask):
        out = self.m.qformer(query_embeds=self.m.embeddings(input_ids=input_ids), query_length=0,
                             attention_mask=mask).last_hidden_state
        return F.normalize(self.m.text_projection(out[:, 0]), dim=-1)  # (B, D)

    def itc(self, image_feat, text_feat, same):
        """Image-text contrast: each image's best-matching query against every caption of the batch;
        captions that are equal count as positives for each other."""
        temp = self.log_temp.exp().clamp(0.001, 0.5)
        sim = torch.einsum("bqd,td->bqt", image_feat, text_feat).max(dim=1).values / temp  # (B_img, B_txt)
        target = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2, sim.detach()

    def itm_logits(self, image_embeds, input_ids, mask):
        queries = self.m.query_tokens.expand(len(input_ids), -1, -1)
        embeds = self.m.embeddings(input_ids=input_ids, query_embeds=queries)
        full_mask = torch.cat([torch.ones(queries.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
        out = self.m.qformer(query_embeds=embeds, query_length=queries.shape[1], attention_mask=full_mask,
                             encoder_hidden_states=image_embeds).last_hidden_state
        return self.m.itm_head(out[:, : queries.shape[1]]).mean(dim=1)  # (N, 2)

    def itm(self, image_embeds, input_ids, mask, sim, same, gen: torch.Generator):
        """Matching with hard negatives: for each image the caption it confuses most (sampled by
        similarity), for each caption the image it confuses most; equal captions are never negatives."""
        weights = (sim.softmax(1).masked_fill(same.bool(), 0) + 1e-9).cpu()  # sampled on the CPU generator
        neg_text = torch.multinomial(weights, 1, generator=gen).squeeze(1).to(sim.device)
        neg_image = torch.multinomial(weights.t().contiguous(), 1, generator=gen).squeeze(1).to(sim.device)
        emb = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]])
        ids = torch.cat([input_ids, input_ids[neg_text], input_ids])
        msk = torch.cat([mask, mask[neg_text], mask])
        labels = torch.cat([torch.ones(len(input_ids)), torch.zeros(2 * len(input_ids))]).long().to(ids.device)
        logits = self.itm_logits(emb, ids, msk)
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean().item()

    def step(self, pixel_values, captions: list[str], gen: torch.Generator) -> dict:
        device = pixel_values.device
        input_ids, mask = (x.to(device) for x in self.text(captions))
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float, device=device)
        image_embeds, image_feat = self.image_side(pixel_values)
        itc, sim = self.itc(image_feat, self.text_side(input_ids, mask), same)
        itm, itm_acc = self.itm(image_embeds, input_ids, mask, sim, same, gen)
        return {"loss": itc + itm, "itc": itc.item(), "itm": itm.item(), "itm_acc": itm_acc}


def pairs_by_image(records: list[dict]) -> list[tuple[str, list[str]]]:
    by_image: dict[str, list[str]] = {}
    for r in records:
        by_image.setdefault(r["image_path"], []).append(r["output"])
    return sorted(by_image.items())


def align_vision(model, tokenizer, image_processor, records: list[dict], settings, seed: int = 0,
                 console=None) -> dict:
    """Train `model`'s ViT, query tokens and Q-Former on ITC + ITM over caption records for
    `settings.steps` steps (a recipe's [contrast] section: steps, batch_size, lr, warmup_steps); returns
    the last step's figures."""
    torch.manual_seed(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    images = pairs_by_image(records)
    vocab = CaptionVocab(tokenizer, [c for _, caps in images for c in caps], MAX_TEXT_TOKENS)
    retrieval = retrieval_model(model, len(vocab)).to(device).train()
    contrast = Contrast(retrieval, vocab)
    contrast.log_temp.data = contrast.log_temp.data.to(device)
    params = [p for p in retrieval.parameters() if p.requires_grad] + [contrast.log_temp]
    from mmagent.train.trainer import adamw
    opt = adamw(params, lr=settings.lr, weight_decay=0.05)
    warmup = max(1, settings.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * max(0.0, 1 - s / settings.steps))
    pixels_of: dict[str, torch.Tensor] = {}
    start, last = time.perf_counter(), {}
    for step in range(1, settings.steps + 1):
        batch = rng.sample(images, min(settings.batch_size, len(images)))
        for path, _ in batch:
            if path not in pixels_of:
                pixels_of[path] = image_processor(images=load_image(path), return_tensors="pt")["pixel_values"][0]
        pixel_values = torch.stack([pixels_of[p] for p, _ in batch]).to(device)
        out = contrast.step(pixel_values, [rng.choice(caps) for _, caps in batch], gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        last = {k: (v.item() if torch.is_tensor(v) else v) for k, v in out.items()}
        if console is not None and (step % 50 == 0 or step == settings.steps):
            console.print(f"  vision align step {step}/{settings.steps}  itc {last['itc']:.3f}  itm {last['itm']:.3f}"
                          f"  itm acc {last['itm_acc']:.2f}  {time.perf_counter() - start:.0f} s")
    write_back(retrieval, model)
    return {"steps": settings.steps, "seconds": round(time.perf_counter() - start, 1), **last}
