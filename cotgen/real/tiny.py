"""Tiny randomly initialised configs of the real-model classes (tests, CPU smoke runs).

Each builder returns the same transformers classes the real checkpoints load into
(``JanusForConditionalGeneration`` + ``JanusProcessor``, ``LlavaOnevisionForConditionalGeneration``
+ ``LlavaOnevisionProcessor``, ``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor``,
``Mask2FormerForUniversalSegmentation``, ``CLIPModel`` + ``CLIPProcessor``), with
byte-level tokenizers so any prompt tokenizes, and chat templates shaped like the real
ones. Nothing is downloaded.
"""

from __future__ import annotations

import re

import torch

#: Janus-Pro's special tokens (names as in deepseek's tokenizer)
JANUS_SPECIALS = {
    "bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "pad": "<｜▁pad▁｜>",
    "image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>",
}

#: Janus-Pro's conversation format (deepseek's "<|User|>: ...\n\n<|Assistant|>:")
JANUS_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|User|>: {% else %}<|Assistant|>: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)

#: LLaVA-OneVision's (Qwen2) chat format
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Qwen2-VL's chat format (vision tokens around the image pad)
QWEN2VL_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>")


def byte_tokenizer(specials: dict[str, str], extra_words=(), bos: bool = False, eos: bool = False,
                   padding_side: str = "left"):
    """A byte-level BPE ``PreTrainedTokenizerFast``: every byte a token, plus
    ``extra_words`` as whole tokens (so "yes"/"no" are single tokens) and special tokens
    (``specials``: role -> token; bos / eos / pad / unk are the standard roles, the
    others become ``extra_special_tokens``). ``bos`` prepends the BOS token, ``eos`` appends the EOS token (CLIP pools there)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    standard = {k: specials[k] for k in ("bos", "eos", "pad", "unk") if k in specials}
    extra = {k: v for k, v in specials.items() if k not in standard}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **{f"{k}_token": v for k, v in standard.items()},
                                  extra_special_tokens=extra, padding_side=padding_side)
    tok.add_special_tokens({"additional_special_tokens": list(extra.values())})
    if extra_words:
        tok.add_tokens(list(extra_words))
    if bos or eos:
        b, e = (specials["bos"] + " ") if bos else "", (" " + specials["eos"]) if eos else ""
        used = [specials[k] for k, on in (("bos", bos), ("eos", eos)) if on]
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{b}$A{e}", pair=f"{b}$A $B{e}", special_tokens=[(t, tok.convert_tokens_to_ids(t)) for t in used])
    return tok


# ---------------------------------------------------------------------------- Janus
def tiny_janus(seed: int = 0, image_size: int = 32, patch_size: int = 4, hidden_size: int = 32, layers: int = 2,
               codebook_size: int = 64, sharpen: float = 8.0):
    """A :class:`~cotgen.real.janus.JanusGenerator` over a random
    ``JanusForConditionalGeneration`` (``(image_size / patch_size)^2`` image codes; the
    VQ decoder upsamples by ``patch_size``) and a ``JanusProcessor`` with Janus-Pro's
    special tokens and conversation format. ``sharpen`` scales the generation head so that
    samples depend on the prompt."""
    import math

    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusProcessor, JanusVisionConfig,
                              JanusVQVAEConfig, LlamaConfig)

    from cotgen.real.janus import JanusGenerator

    tok = byte_tokenizer(JANUS_SPECIALS, extra_words=["<|User|>", "<|Assistant|>"], bos=True)
    grid = image_size // patch_size
    levels = int(math.log2(patch_size)) + 1
    config = JanusConfig(
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=JanusVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=image_size, patch_size=patch_size, projection_dim=hidden_size,
                                        num_image_tokens=grid * grid, mlp_ratio=2.0, depth=1),
        vq_config=JanusVQVAEConfig(embed_dim=4, num_embeddings=codebook_size, latent_channels=32, base_channels=32,
                                   channel_multiplier=[1] * levels, num_res_blocks=1, projection_dim=hidden_size,
                                   image_token_embed_dim=hidden_size),
        image_token_id=tok.convert_tokens_to_ids(JANUS_SPECIALS["image_token"]),
    )
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.generation_head.vision_head.weight.mul_(sharpen)
    processor = JanusProcessor(image_processor=_janus_image_processor(image_size),
                               tokenizer=tok, chat_template=JANUS_CHAT_TEMPLATE, num_image_tokens=grid * grid)
    return JanusGenerator(model, processor)


#: Janus-Pro language-model sizes (DeepSeek-LLM backbones; vocabulary 102,400, 384x384
#: images as 24x24 codes of a 16,384-entry VQ codebook; the SigLIP-L understanding tower
#: and the VQ model are the same for both)
JANUS_PRO_ARCHITECTURES = {
    "janus-pro-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16),
    "janus-pro-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32),
}


def random_janus_pro(arch: str = "janus-pro-1b", device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                     seed: int = 0):
    """A :class:`~cotgen.real.janus.JanusGenerator` over a *randomly initialised*
    ``JanusForConditionalGeneration`` with Janus-Pro's architecture (``arch``: a key of
    :data:`JANUS_PRO_ARCHITECTURES`), built directly on ``device`` in ``dtype``. Its
    speed and memory are the real model's; its images are noise. For throughput
    measurements (benchmarks/bench_janus_gpu.py) without the weights.

    Raises:
        KeyError: unknown ``arch``.
    """
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusProcessor, JanusVisionConfig,
                              JanusVQVAEConfig, LlamaConfig)

    from cotgen.real.janus import JanusGenerator

    if arch not in JANUS_PRO_ARCHITECTURES:
        raise KeyError(f"unknown Janus-Pro architecture {arch!r}; expected one of {list(JANUS_PRO_ARCHITECTURES)}")
    size = JANUS_PRO_ARCHITECTURES[arch]
    tok = byte_tokenizer(JANUS_SPECIALS, extra_words=["<|User|>", "<|Assistant|>"], bos=True)
    hidden = size["hidden_size"]
    config = JanusConfig(
        text_config=LlamaConfig(vocab_size=102400, num_key_value_heads=size["num_attention_heads"],
                                max_position_embeddings=16384, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **size),
        vision_config=JanusVisionConfig(projection_dim=hidden),
        vq_config=JanusVQVAEConfig(projection_dim=hidden, image_token_embed_dim=hidden),
        image_token_id=tok.convert_tokens_to_ids(JANUS_SPECIALS["image_token"]),
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = JanusForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    processor = JanusProcessor(image_processor=_janus_image_processor(384), tokenizer=tok,
                               chat_template=JANUS_CHAT_TEMPLATE, num_image_tokens=576)
    return JanusGenerator(model, processor)


def _janus_image_processor(size: int):
    import transformers

    cls = getattr(transformers, "JanusImageProcessorPil", None) or transformers.JanusImageProcessor
    return cls(size={"height": size, "width": size})


# ---------------------------------------------------------------------------- judges
def _without_video(cls, **kwargs):
    """``cls(video_processor=None, **kwargs)``: VLM processors also take a video
    processor, which needs torchvision (not installed on the CPU test machine); images
    never touch it."""
    original = cls.check_argument_for_proper_class

    def check(self, name, arg):
        if name == "video_processor" and arg is None:
            return None
        return original(self, name, arg)

    cls.check_argument_for_proper_class = check
    try:
        return cls(video_processor=None, **kwargs)
    finally:
        cls.check_argument_for_proper_class = original


def _judge_words() -> list[str]:
    from cotgen.reward.vlm_judge import ANSWERS

    return list(ANSWERS)


def tiny_llava_onevision(seed: int = 0, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32):
    """``(model, processor)``: a random ``LlavaOnevisionForConditionalGeneration``
    (SigLIP vision tower + Qwen2) and a ``LlavaOnevisionProcessor`` with the Qwen chat
    format; any-resolution tiling over a single ``image_size`` grid."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, Qwen2Config,
                              SiglipVisionConfig)

    tok = byte_tokenizer({"eos": "<|im_end|>", "pad": "<|endoftext|>", "image_token": "<image>",
                          "video_token": "<video>", "start": "<|im_start|>"}, extra_words=_judge_words())
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                         num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                                         patch_size=patch_size),
        text_config=Qwen2Config(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[image_size, image_size]], vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                                      image_grid_pinpoints=[[image_size, image_size]],
                                                      do_pad=True)
    processor = _without_video(LlavaOnevisionProcessor, image_processor=image_processor, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE,
                                        num_image_tokens=(image_size // patch_size) ** 2,
                                        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1")
    return model, processor


def tiny_qwen2vl(seed: int = 0, hidden_size: int = 32, patch_size: int = 8, image_size: int = 32):
    """``(model, processor)``: a random ``Qwen2VLForConditionalGeneration`` and a
    ``Qwen2VLProcessor`` (images resized to ``image_size`` square)."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil,
                              Qwen2VLProcessor)

    tok = byte_tokenizer({"eos": "<|im_end|>", "pad": "<|endoftext|>", "image_token": "<|image_pad|>",
                          "video_token": "<|video_pad|>", "vision_start": "<|vision_start|>",
                          "vision_end": "<|vision_end|>", "start": "<|im_start|>"}, extra_words=_judge_words())
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in
           {"image": "<|image_pad|>", "video": "<|video_pad|>", "vs": "<|vision_start|>", "ve": "<|vision_end|>"}.items()}
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                          "mrope_section": [2, 3, 3]},
                     "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id},
        vision_config={"depth": 1, "embed_dim": hidden_size, "hidden_size": hidden_size, "num_heads": 2,
                       "mlp_ratio": 2, "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "in_channels": 3},
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vs"],
        vision_end_token_id=ids["ve"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                               min_pixels=pixels, max_pixels=pixels)
    processor = _without_video(Qwen2VLProcessor, image_processor=image_processor, tokenizer=tok, chat_template=QWEN2VL_CHAT_TEMPLATE)
    return model, processor


# ---------------------------------------------------------------------------- detector
#: COCO's 80 thing classes with COCO's own names (as a COCO Mask2Former's id2label has them)
COCO_THINGS = (
    "person bicycle car motorcycle airplane bus train truck boat |traffic light|fire hydrant|stop sign|parking meter| "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard |sports ball| kite |baseball bat|baseball glove| skateboard surfboard |tennis racket| bottle "
    "|wine glass| cup fork knife spoon bowl banana apple sandwich orange broccoli carrot |hot dog| pizza donut cake "
    "chair couch |potted plant| bed |dining table| toilet tv laptop mouse remote keyboard |cell phone| microwave oven "
    "toaster sink refrigerator book clock vase scissors |teddy bear|hair drier| toothbrush"
)


def coco_thing_names() -> list[str]:
    """The 80 COCO thing names in COCO's order (``mouse``, ``remote``, ``keyboard`` as COCO
    spells them)."""
    out = []
    for part in re.split(r"\|", COCO_THINGS):
        part = part.strip()
        if not part:
            continue
        out += [part] if " " in part and part in {"traffic light", "fire hydrant", "stop sign", "parking meter",
                                                 "sports ball", "baseball bat", "baseball glove", "tennis racket",
                                                 "wine glass", "hot dog", "potted plant", "dining table",
                                                 "cell phone", "teddy bear", "hair drier"} else part.split()
    return out


def tiny_mask2former(seed: int = 0, num_queries: int = 8):
    """A random ``Mask2FormerForUniversalSegmentation`` (tiny Swin backbone) with COCO's
    80 thing labels (COCO's names) and its image processor."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers import Mask2FormerImageProcessorPil

    names = coco_thing_names()
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_queries=num_queries, hidden_dim=32, mask_feature_size=32,
                               feature_size=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               encoder_feedforward_dim=64, dim_feedforward=64, common_stride=4,
                               id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    processor = Mask2FormerImageProcessorPil(size={"height": 64, "width": 64}, do_resize=True)
    return model, processor


def tiny_clip(seed: int = 0, image_size: int = 32):
    """A random ``CLIPModel`` and a ``CLIPProcessor`` (byte-level tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tok = byte_tokenizer({"bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"}, bos=True,
                         eos=True, padding_side="right")
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 128, "eos_token_id": tok.eos_token_id,
                     "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tok)
