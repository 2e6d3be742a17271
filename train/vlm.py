"""One vision-language model at run time: prompt building, image embedding, answer-only loss, greedy decoding.

The trainer, the evaluator and the SDK's torch backend all go through this, so a prompt is built one
way everywhere. Soft-prompt vectors ride in front of the image features: the user turn holds
`n_soft + n_image` placeholder tokens and the concatenated vectors fill them in order (the edge backend
feeds the same vectors to llama.cpp as one embedding batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmagent.prompt import DEFAULT_SYSTEM, chat_prompt, prompt_ids, user_text
from mmagent.train.families import family_for



@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt: loss only on the answer (labels[1:] are the targets)
    instruction: str = ""  # the user turn's text: what InstructBLIP's Q-Former reads


def added_bos(tokenizer) -> int | None:
    """The id transformers' tokenizer puts before a text (add_special_tokens=True): `<s>` for LLaMA-2 / Vicuna /
    LLaVA-1.5, `</s>` for OPT; None when it adds nothing there (SmolLM2; Flan-T5 adds `</s>` after the text)."""
    plain, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    return full[0] if full[1:1 + len(plain)] == plain else None


def _cache_arg(decoder) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache`; the GPU image has 5.17."""
    import inspect
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class VLM:
    def __init__(self, model, tokenizer, image_processor, system: str = DEFAULT_SYSTEM, qformer_tokenizer=None):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.family = family_for(model)
        self.system = system
        # An encoder-decoder LLM (Flan-T5) reads the prompt in its encoder and writes the answer in its decoder.
        self.seq2seq = self.family.encoder_decoder(self.base_model)
        self.qformer_tokenizer = qformer_tokenizer
        if self.family.reads_instruction and qformer_tokenizer is None:
            self.qformer_tokenizer = self.family.instruction_tokenizer(self.base_model)

    # ---- prompts -------------------------------------------------------------------------------
    @property
    def base_model(self):
        """The transformers model under any PEFT wrapper (PEFT injects LoRA in place, so it carries it)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def placeholder(self, n_soft: int = 0) -> str:
        token = self.tokenizer.convert_ids_to_tokens(self.family.image_token_id(self.base_model))
        return token * (n_soft + self.family.n_image_tokens(self.base_model))

    @property
    def bos(self) -> int | None:
        """The BOS id the checkpoint's tokenizer starts a text with (None: it adds none); cached."""
        if not hasattr(self, "_bos"):
            self._bos = added_bos(self.tokenizer)
        return self._bos

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of a prompt text: BOS where the checkpoint's tokenizer and processor put it
        (mmagent.prompt.prompt_ids), so that training, every backend and stock llama.cpp see one prompt."""
        image_token = self.tokenizer.convert_ids_to_tokens(self.family.image_token_id(self.base_model))
        return prompt_ids(lambda t: self.tokenizer(t, add_special_tokens=False).input_ids, text, image_token,
                          self.bos, self.family.image_first)

    def prompt_text(self, instruction: str, input: str = "", n_soft: int = 0, history=()) -> str:
        """The full prompt up to where the assistant starts answering. `history`: earlier (user, answer) turns."""
        return chat_prompt(self.tokenizer, self.system, self.placeholder(n_soft), instruction, input, history)

    def encode(self, instruction: str, input: str, output: str | None, n_soft: int = 0) -> Encoded:
        tok = self.tokenizer
        prompt = self.prompt_ids(self.prompt_text(instruction, input, n_soft))
        said = user_text(instruction, input)
        if output is None:
            return Encoded(prompt, [-100] * len(prompt), said)
        answer = tok(output, add_special_tokens=False).input_ids + [tok.eos_token_id]
        if self.seq2seq:  # the encoder reads the prompt; the decoder's targets are the answer
            return Encoded(prompt, [-100] + answer, said)
        return Encoded(prompt + answer, [-100] * len(prompt) + answer, said)

    def instruction_inputs(self, texts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(Q-Former token ids, mask) of each user turn for a bridge that reads the instruction, else None."""
        if not self.family.reads_instruction:
            return None
        enc = self.qformer_tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                                     max_length=self.family.max_instruction_tokens(self.base_model))
        return enc.input_ids.to(device), enc.attention_mask.to(device)

    def batch_instruction(self, batch: dict):
        return (batch["qformer_input_ids"], batch["qformer_attention_mask"]) if "qformer_input_ids" in batch else None

    def pixels(self, images) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt").pixel_values

    # ---- forward -------------------------------------------------------------------------------
    def image_embeds(self, pixel_values: torch.Tensor, soft_prompt: torch.Tensor | None = None,
                     instruction=None) -> torch.Tensor:
        """(B, n_soft + n_image, H): the vectors that fill the placeholders. `instruction`: instruction_inputs()."""
        feats = self.family.image_features(self.base_model, pixel_values, instruction)
        if soft_prompt is not None:
            feats = torch.cat([soft_prompt.to(feats.dtype).expand(feats.shape[0], -1, -1), feats], dim=1)
        return feats

    def input_embeds(self, input_ids, pixel_values, soft_prompt=None, instruction=None) -> torch.Tensor:
        return self.embed_with(input_ids, self.image_embeds(pixel_values, soft_prompt, instruction))

    def embed_with(self, input_ids, feats, static: bool = False) -> torch.Tensor:
        """Token embeddings with the placeholders filled by `feats` (B, n_soft + n_image, H) in order.
        static: no step waits on the device (CUDA graphs); the caller has checked that every row holds
        exactly n_soft + n_image placeholders, and row b's k-th placeholder takes feats[b, k]."""
        embeds = self.family.embed_tokens(self.base_model)(input_ids)
        mask = (input_ids == self.family.image_token_id(self.base_model)).unsqueeze(-1)
        if static:
            order = (mask.squeeze(-1).long().cumsum(1) - 1).clamp(0, feats.shape[1] - 1)
            picked = feats.to(embeds.dtype).gather(1, order.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
            return torch.where(mask, picked, embeds)
        if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"prompt has {int(mask.sum())} image placeholders, expected "
                             f"{feats.shape[0] * feats.shape[1]}; build prompts with VLM.encode")
        return embeds.masked_scatter(mask, feats.to(embeds.dtype))

    def hidden(self, inputs_embeds, attention_mask, static: bool = False, **kw):
        """static (right-padded training batches): no attention mask for the decoder, only causality. A real
        token never attends to the padding after it, so its output is the same, and transformers need not
        read the mask on the host to pick the kernel (which a CUDA graph cannot do)."""
        # Positions count real tokens only, so a left-padded row sees the same positions as an unpadded one.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1]:]
        # No key/value cache unless decoding asks for one: transformers' default (config.use_cache) builds one
        # in training too, a copy (torch.cat) of every layer's keys and values in each forward, dropped after it
        kw.setdefault("use_cache", False)
        return self.family.decoder(self.base_model)(
            inputs_embeds=inputs_embeds, attention_mask=None if static else attention_mask,
            position_ids=position_ids, **kw)

    def _last_hidden(self, batch: dict, soft_prompt) -> torch.Tensor:
        static = "answer_index" in batch  # a static batch (Trainer.collate with CUDA graphs)
        feats = self.image_embeds(batch["pixel_values"], soft_prompt, self.batch_instruction(batch))
        embeds = self.embed_with(batch["input_ids"], feats, static)
        return self.hidden(embeds, batch["attention_mask"], static).last_hidden_state

    def loss(self, batch: dict, soft_prompt=None, vocab: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
        """Mean cross-entropy over answer tokens; logits only where labels exist (the vocab is the cost).
        reduction="none": one loss per answer token, row by row (what per-task losses are summed from).

        `vocab` (sorted token ids holding every label) restricts the softmax to those tokens: exact for the
        targets' relative odds, and for a from-scratch LLM on a small caption vocabulary most of the step
        time saved (49k -> ~100 logits a position)."""
        if self.seq2seq:
            return self._seq2seq_loss(batch, soft_prompt, reduction)
        if "answer_index" in batch:
            return self._static_loss(batch, soft_prompt, vocab, reduction)
        h = self._last_hidden(batch, soft_prompt)
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        head = self.family.head(self.base_model)
        if vocab is None:
            return torch.nn.functional.cross_entropy(head(h[:, :-1][keep]).float(), labels[keep], reduction=reduction)
        logits = torch.nn.functional.linear(h[:, :-1][keep], head.weight[vocab],
                                            None if head.bias is None else head.bias[vocab])
        return torch.nn.functional.cross_entropy(logits.float(), torch.searchsorted(vocab, labels[keep]),
                                                 reduction=reduction)

    def _static_loss(self, batch: dict, soft_prompt, vocab, reduction: str) -> torch.Tensor:
        """VLM.loss with every shape fixed by the batch and no host read of device values (CUDA graphs):
        the answer positions come as flat indices into (B x T) (`answer_index`, from the host) with their
        targets (`answer_targets`); padding entries have target -100 and a loss of 0, and come last."""
        h = self._last_hidden(batch, soft_prompt)
        picked = h.reshape(-1, h.shape[-1]).index_select(0, batch["answer_index"])
        targets = batch["answer_targets"]
        valid = targets != -100
        head = self.family.head(self.base_model)
        if vocab is None:
            logits, targets = head(picked), targets.clamp(min=0)
        else:
            logits = torch.nn.functional.linear(picked, head.weight[vocab], None if head.bias is None else head.bias[vocab])
            targets = torch.searchsorted(vocab, targets.clamp(min=0))
        tokens = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none") * valid
        return tokens if reduction == "none" else tokens.sum() / valid.sum()

    def logits(self, batch: dict, soft_prompt=None) -> torch.Tensor:
        return self.family.head(self.base_model)(self._last_hidden(batch, soft_prompt))

    # ---- decoding ------------------------------------------------------------------------------
    def left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (n - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
        return ids, mask

    @torch.no_grad()
    def generate(self, pixel_values, prompts: list[list[int]], max_new_tokens: int = 16, soft_prompt=None,
                 instruction=None, on_token=None, stop_at_eos: bool = True, choose=None) -> list[list[int]]:
        """Greedy decoding for a batch of prompts (or `choose(logits [B, V]) -> ids [B]`); `on_token(step,
        token_ids)` streams each step and ends decoding by returning True. `stop_at_eos=False` decodes
        exactly max_new_tokens (benchmarks)."""
        from transformers.cache_utils import DynamicCache
        ids, mask = self.left_pad(prompts)
        ids, mask = ids.to(pixel_values.device), mask.to(pixel_values.device)
        embeds = self.input_embeds(ids, pixel_values, soft_prompt, instruction)
        graphs = getattr(self, "graph_decoder", None)  # the torch backend's on CUDA (train/graph_decode.py)
        if graphs is not None and len(prompts) == 1 and choose is None and not self.seq2seq:
            return [graphs.generate(embeds, max_new_tokens, on_token, stop_at_eos)]
        if self.seq2seq:
            return self._seq2seq_generate(embeds, mask, max_new_tokens, on_token, stop_at_eos, choose)
        cache, eos = DynamicCache(), self.tokenizer.eos_token_id if stop_at_eos else -1
        out = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device)
        head, embed = self.family.head(self.base_model), self.family.embed_tokens(self.base_model)
        cache_kw = {_cache_arg(self.family.decoder(self.base_model)): cache}
        for step in range(max_new_tokens):
            h = self.hidden(embeds, mask, use_cache=True, **cache_kw).last_hidden_state
            logits = head(h[:, -1])
            nxt = logits.argmax(-1) if choose is None else choose(logits)
            for i, t in enumerate(nxt.tolist()):
                if not done[i] and t != eos:
                    out[i].append(t)
            done |= nxt == eos
            if on_token and on_token(step, nxt.tolist()):
                break
            if bool(done.all()):
                break
            embeds = embed(nxt[:, None])
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return out

    # ---- encoder-decoder LLMs (Flan-T5) --------------------------------------------------------
    def _seq2seq_loss(self, batch: dict, soft_prompt, reduction: str) -> torch.Tensor:
        """Cross-entropy of the decoder on the answer (labels[:, 1:]); the encoder reads prompt + image."""
        lm = self.family.causal_lm(self.base_model)
        embeds = self.input_embeds(batch["input_ids"], batch["pixel_values"], soft_prompt,
                                   self.batch_instruction(batch))
        labels = batch["labels"][:, 1:]
        logits = lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                    decoder_input_ids=lm._shift_right(labels)).logits
        keep = labels != -100
        return torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction=reduction)

    def _seq2seq_generate(self, embeds, mask, max_new_tokens, on_token, stop_at_eos, choose) -> list[list[int]]:
        """Greedy decoding with the encoder run once; the decoder re-reads its short answer each step."""
        lm = self.family.causal_lm(self.base_model)
        encoded = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        start = lm.config.decoder_start_token_id
        dec = torch.full((embeds.shape[0], 1), start, dtype=torch.long, device=embeds.device)
        eos = self.tokenizer.eos_token_id if stop_at_eos else -1
        out = [[] for _ in range(embeds.shape[0])]
        done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        for step in range(max_new_tokens):
            logits = lm(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
            nxt = logits.argmax(-1) if choose is None else choose(logits)
            for i, t in enumerate(nxt.tolist()):
                if not done[i] and t != eos:
                    out[i].append(t)
            done |= nxt == eos
            if (on_token and on_token(step, nxt.tolist())) or bool(done.all()):
                break
            dec = torch.cat([dec, nxt[:, None]], dim=1)
        return out

    # ---- ranking answers -----------------------------------------------------------------------
    def answer_logprobs(self, prompts: list[list[int]], feats: torch.Tensor, answers: list[list[int]]) -> torch.Tensor:
        """(len(prompts), len(answers)): log-likelihood of each answer's tokens after each prompt, the
        image rows `feats` (one per prompt) filling its placeholders."""
        device = feats.device
        if self.seq2seq:
            seqs = [(p, [-100] + a) for p in prompts for a in answers]
        else:
            seqs = [(p + a, [-100] * len(p) + a) for p in prompts for a in answers]
        n, m = max(len(x) for x, _ in seqs), max(len(y) for _, y in seqs)
        ids = torch.tensor([x + [0] * (n - len(x)) for x, _ in seqs], device=device)
        labels = torch.tensor([y + [-100] * (m - len(y)) for _, y in seqs], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in seqs], device=device)
        embeds = self.embed_with(ids, feats.repeat_interleave(len(answers), 0))
        target = labels[:, 1:]
        if self.seq2seq:
            lm = self.family.causal_lm(self.base_model)
            logits = lm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=lm._shift_right(target)).logits
        else:
            logits = self.family.head(self.base_model)(self.hidden(embeds, mask).last_hidden_state[:, :-1])
        logp = torch.log_softmax(logits.float(), -1)
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != -100)
        return picked.sum(-1).view(len(prompts), len(answers))

