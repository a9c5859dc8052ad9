"""The VLM judge path end to end on a tiny random LlavaForConditionalGeneration:
processor chat template, yes/no scoring, LoRA fine-tuning with trl's SFTTrainer."""

import numpy as np
import pytest
import torch
from PIL import Image

from cotgen.reward.judge import Judge
from cotgen.reward.vlm_judge import VLMJudge, finetune_vlm_judge, tiny_llava_judge
from cotgen.world.render import render_scene

META = {"tag": "single_object", "include": [{"class": "star", "count": 1}], "prompt": "a photo of a star"}


@pytest.fixture(scope="module")
def judge():
    return tiny_llava_judge(seed=0)


def test_chat_template_has_image_question_and_answer_slot(judge):
    text = judge.prompt_texts("outcome", ["a photo of a star"])[0]
    assert text.startswith("USER : <image>") and text.endswith("ASSISTANT :")
    assert "accurately represent the prompt" in text
    ids = judge.processor.tokenizer.encode(text, add_special_tokens=False)
    assert judge.processor.tokenizer.unk_token_id not in ids


def test_scores_are_probabilities_and_batch_invariant(judge):
    assert isinstance(judge, Judge)
    rng = np.random.default_rng(0)
    images = [render_scene(META, rng)[0] for _ in range(3)]
    prompts = ["a photo of a star", "a photo of two red circles", "a photo of a star"]
    batch = judge.score("potential", prompts, images, progress=[0.5, 0.5, 1.0])
    alone = np.concatenate([judge.score("potential", [p], [im]) for p, im in zip(prompts, images)])
    assert batch.shape == (3,) and ((batch > 0) & (batch < 1)).all()
    np.testing.assert_allclose(batch, alone, atol=1e-5)  # left padding does not change the answer


def test_bad_input(judge):
    with pytest.raises(ValueError, match="unknown question"):
        judge.score("beauty", ["a photo of a star"], [Image.new("RGB", (64, 64))])
    with pytest.raises(ValueError, match="1 prompts but 0 images"):
        judge.score("outcome", ["a photo of a star"], [])


def test_lora_finetune_learns_a_rule_and_merges(tmp_path):
    """Label = is the image mostly bright; a few LoRA steps must move P(yes) the right way."""
    torch.manual_seed(0)
    judge = tiny_llava_judge(seed=1)
    bright, dark = Image.new("RGB", (64, 64), (250, 250, 250)), Image.new("RGB", (64, 64), (5, 5, 5))
    examples = [("outcome", "a photo of a star", im, lab) for im, lab in [(bright, True), (dark, False)] * 8]
    before = judge.score("outcome", ["a photo of a star"] * 2, [bright, dark])
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "linear_1", "linear_2")
    tuned, metrics = finetune_vlm_judge(judge, examples, tmp_path, lora_rank=8, lora_alpha=16, target_modules=modules,
                                        steps=40, batch_size=8, learning_rate=2e-2)
    after = tuned.score("outcome", ["a photo of a star"] * 2, [bright, dark])
    assert (after[0] - after[1]) > (before[0] - before[1]) + 0.15
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    tuned.save_pretrained(tmp_path / "judge")
    again = VLMJudge.from_pretrained(tmp_path / "judge")
    np.testing.assert_allclose(again.score("outcome", ["a photo of a star"] * 2, [bright, dark]), after, atol=1e-5)


def test_full_training_from_scratch_and_deadline(tmp_path):
    """lora_rank 0 trains every weight (a judge from scratch); max_seconds stops early."""
    judge = tiny_llava_judge(seed=2, patch_size=8, hidden_size=32, vision_layers=1, text_layers=1)
    bright, dark = Image.new("RGB", (64, 64), (250, 250, 250)), Image.new("RGB", (64, 64), (5, 5, 5))
    examples = [("outcome", "a photo of a star", im, lab) for im, lab in [(bright, True), (dark, False)] * 8]
    weight = judge.model.get_input_embeddings().weight.detach().clone()
    tuned, metrics = finetune_vlm_judge(judge, examples, tmp_path, lora_rank=0, steps=30, batch_size=8,
                                        learning_rate=1e-2, warmup_steps=3)
    assert metrics["steps"] == 30 and not (tmp_path / "adapter").exists()
    assert not torch.equal(tuned.model.get_input_embeddings().weight, weight)
    after = tuned.score("outcome", ["a photo of a star"] * 2, [bright, dark])
    assert after[0] > after[1]
    _, short = finetune_vlm_judge(tiny_llava_judge(seed=3), examples, tmp_path / "b", lora_rank=0, steps=10_000,
                                  batch_size=8, max_seconds=0.0)
    assert short["steps"] < 10_000
