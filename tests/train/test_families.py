"""Families on tiny random configs of the real transformers classes."""
import pytest
import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, CLIPVisionConfig, InstructBlipConfig,
                          InstructBlipForConditionalGeneration, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, OPTConfig)

from mmagent.train.adapters import AdapterError, inject_lora
from mmagent.train.families import expand_presets, family_for
from mmagent.train.recipe import LoraSection

LLM = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
              patch_size=8)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               encoder_hidden_size=32, vocab_size=100)


def blip2(text=None):
    torch.manual_seed(0)
    return Blip2ForConditionalGeneration(Blip2Config(
        vision_config=VISION, qformer_config=QFORMER, text_config=(text or LlamaConfig(**LLM)).to_dict(),
        num_query_tokens=4, image_token_index=99)).eval()


def instructblip():
    torch.manual_seed(0)
    return InstructBlipForConditionalGeneration(InstructBlipConfig(
        vision_config=VISION, qformer_config=QFORMER, text_config=LlamaConfig(**LLM).to_dict(),
        num_query_tokens=4, image_token_index=99)).eval()


def llava():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(**VISION, projection_dim=32)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision.to_dict(), text_config=LlamaConfig(**LLM).to_dict(),
                                                     image_token_index=99)).eval()


@pytest.mark.parametrize("build,name,n_tokens", [(blip2, "blip2", 4), (instructblip, "instructblip", 4),
                                                 (llava, "llava", 4)])
def test_family_dispatch_and_image_features(build, name, n_tokens):
    model = build()
    fam = family_for(model)
    assert fam.name == name
    pixels = torch.randn(2, 3, 16, 16)
    ids = torch.randint(0, 100, (2, 5))
    instr = (ids, torch.ones_like(ids)) if fam.reads_instruction else None
    feats = fam.image_features(model, pixels, instr)
    assert feats.shape == (2, fam.n_image_tokens(model), 32) and fam.n_image_tokens(model) == n_tokens
    # the decoder + head path equals the model's own language path on the same embeddings
    emb = fam.embed_tokens(model)(torch.randint(0, 99, (1, 6)))
    h = fam.decoder(model)(inputs_embeds=emb).last_hidden_state
    assert fam.head(model)(h).shape == (1, 6, 100)


@pytest.mark.parametrize("build", [blip2, instructblip, llava])
def test_lora_presets_reach_llm_and_bridge(build):
    model = build()
    fam = family_for(model)
    cfg = LoraSection(r=2, alpha=4, dropout=0.0, llm=list(fam.parts.presets["llm"]),
                      bridge=list(fam.parts.presets["bridge"]), vision=[])
    peft = inject_lora(model, fam, cfg, "t")
    names = [n for n, _ in peft.named_parameters() if "lora_A" in n]
    assert any(fam.parts.llm in n for n in names) and any(fam.parts.bridge in n for n in names)
    assert not any(fam.parts.vision + "." in n for n in names)
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft.named_parameters())


def test_blip2_lora_covers_self_and_cross_attention():
    model = blip2()
    cfg = LoraSection(r=2, llm=[], bridge=["query", "value"], vision=[])
    names = [n for n, _ in inject_lora(model, family_for(model), cfg, "t").named_parameters() if "lora_A" in n]
    assert any(".attention.attention.query" in n for n in names)
    assert any(".crossattention.attention.value" in n for n in names)


def test_missing_lora_module_lists_what_exists():
    model = blip2()
    cfg = LoraSection(llm=["q_proj", "qq_proj"], bridge=[], vision=[])
    with pytest.raises(AdapterError) as e:
        inject_lora(model, family_for(model), cfg, "t")
    assert "qq_proj" in str(e.value) and "available:" in str(e.value) and "o_proj" in str(e.value)


def test_unsupported_architecture_is_named():
    from transformers import T5Config
    with pytest.raises(ValueError, match="no mmagent family.*blip2"):
        family_for(T5Config())


def test_blip2_with_opt_llm_is_a_family_too():
    model = blip2(OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                            word_embed_proj_dim=32))
    assert family_for(model).name == "blip2"


def t5_text():
    from transformers import T5Config
    return T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                    decoder_start_token_id=0)


@pytest.mark.parametrize("build,llm,bridge", [
    (blip2, ["q_proj", "v_proj"], ["query", "value"]), (lambda: blip2(t5_text()), ["q", "v"], ["query", "value"]),
    (llava, ["q_proj", "v_proj"], ["linear_1", "linear_2"])])
def test_recipe_presets_are_the_familys(build, llm, bridge):
    """The recipe's default `preset` asks the family: no module name is hard-coded outside train/families/."""
    model = build()
    fam = family_for(model)
    cfg = expand_presets(LoraSection(), fam, model)
    assert cfg.llm == llm and cfg.bridge == bridge and cfg.vision == []
    mixed = expand_presets(LoraSection(llm=["preset", "o_proj"], vision=["preset"]), fam, model)
    assert mixed.llm[-1] == "o_proj" and mixed.vision == list(fam.presets(model)["vision"])
    inject_lora(model, fam, LoraSection(vision=["preset"]), "t")  # every preset names modules that exist


def test_image_path_prefixes_are_the_familys():
    assert family_for(blip2()).parts.image_path == ("vision_model", "qformer", "language_projection")
    assert family_for(llava()).parts.image_path == ("model.vision_tower", "model.multi_modal_projector")
