"""Preference alignment (cotgen/align): pairs, DPO through trl + peft on tiny random
generators, and the alignment stages on the tiny profile."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from cotgen.align.dpo import (
    build_trainer, dpo_config, lora_config, mask_text_logits, pair_logprob_margin, train_dpo, unmask_text_logits,
)
from cotgen.align.pairs import build_pairs, read_pairs, threshold_sweep, write_pairs
from cotgen.generator.model import ShapesGenerator

from .test_generator import tiny_generator

PROMPTS = ["a photo of a red circle", "a photo of three stars", "a photo of a blue square", "a photo of a green heart"]


def labelled(correct: dict[str, list[bool]], width: int = 8):
    """Tokens (distinct rows) and paths for prompts with the given evaluator labels."""
    paths, rows = [], []
    for prompt, labels in correct.items():
        for j, ok in enumerate(labels):
            paths.append({"prompt": prompt, "tag": "colors", "metadata": {"tag": "colors", "prompt": prompt},
                          "candidate": j, "correct": ok, "split": "heldout" if prompt == "d" else "train"})
            rows.append([len(rows)] * width)
    return torch.tensor(rows), paths


def test_pairs_one_yes_one_no_per_prompt_and_skipping():
    tokens, paths = labelled({"a": [True, False, True, False], "b": [True] * 4, "c": [False] * 4,
                              "d": [False, False, True, False]})
    pairs, stats = build_pairs(tokens, paths, seed=0)
    assert [p["prompt"] for p in pairs] == ["a", "d"]
    assert stats["skipped_all_yes"] == 1 and stats["skipped_all_no"] == 1 and stats["pairs"] == 2
    for p in pairs:
        chosen, rejected = p["chosen"][0], p["rejected"][0]
        assert paths[chosen]["correct"] and not paths[rejected]["correct"]
        assert paths[chosen]["prompt"] == paths[rejected]["prompt"] == p["prompt"]
        assert p["chosen_correct"] and not p["rejected_correct"] and p["labels"] == "evaluator"
    assert pairs[1]["chosen"][0] == 14 and pairs[1]["split"] == "heldout"  # d's only yes
    assert build_pairs(tokens, paths, seed=0)[0] == pairs  # seeded
    picks = {tuple(p["chosen"][:1] + p["rejected"][:1]) for s in range(20) for p in build_pairs(tokens, paths, s)[0][:1]}
    assert len(picks) > 1  # at random among a's yes and no samples
    with pytest.raises(ValueError, match="must match"):
        build_pairs(tokens[:3], paths)


def test_pairs_ranked_by_the_judge():
    tokens, paths = labelled({"a": [False, False, True, True], "b": [True, True, False, False], "c": [True] * 4})
    scores = [0.6, 0.9, 0.2, 0.4, 0.1, 0.3, 0.2, 0.1, 0.5, 0.5, 0.5, 0.5]
    pairs, stats = build_pairs(tokens, paths, scores=scores, threshold=0.5)
    assert [(p["prompt"], p["chosen"][0], p["rejected"][0]) for p in pairs] == [("a", 1, 2)]
    assert pairs[0]["chosen_score"] == 0.9 and pairs[0]["rejected_score"] == 0.2 and pairs[0]["labels"] == "judge"
    assert stats["skipped_all_no"] == 1 and stats["skipped_all_yes"] == 1  # b all below, c all at 0.5
    assert stats["pair_agreement"] == 0.0  # the judge preferred an image the evaluator rejects
    ranked, stats = build_pairs(tokens, paths, scores=scores, threshold=None)
    assert [(p["prompt"], p["chosen"][0], p["rejected"][0]) for p in ranked] == [("a", 1, 2), ("b", 5, 4)]  # ties: the first
    assert stats["skipped_tied"] == 1  # c: every score equal



def test_a_variant_sets_its_own_pairs_knobs_but_not_the_base_seed():
    from cotgen.pipeline.params import load_params
    from cotgen.pipeline.stages import pairs_params

    from .conftest import REPO

    params = load_params(REPO / "params.yaml")
    base = params["align"]["pairs"]
    assert pairs_params(params, "dpo") == base  # the default variants set no pairs knob
    params["align"]["variants"]["parm_dpo_iter"].update(judge_threshold=0.9, samples_per_prompt=16, seed=7)
    own = pairs_params(params, "parm_dpo_iter")
    assert own["judge_threshold"] == 0.9 and own["samples_per_prompt"] == 16
    assert own["seed"] == base["seed"] and set(own) == set(base)  # seed is an offset; labels / init are not pairs knobs
    with pytest.raises(KeyError, match="no DPO variant 'dpo3'.*parm_dpo_iter"):
        pairs_params(params, "dpo3")


def test_judge_pairs_leave_out_unsure_samples():
    """With a reject threshold, samples scored between it and the yes threshold are neither
    chosen nor rejected: a prompt whose only low-scored sample is unsure gives no pair."""
    tokens, paths = labelled({"a": [False, True, False, False], "b": [True, False, False, False]})
    scores = [0.6, 0.95, 0.35, 0.05, 0.9, 0.3, 0.4, 0.45]
    pairs, stats = build_pairs(tokens, paths, scores=scores, threshold=0.8, reject_threshold=0.2)
    assert [(p["prompt"], p["chosen"][0], p["rejected"][0]) for p in pairs] == [("a", 1, 3)]
    assert stats["skipped_all_yes"] == 1  # b: a yes (0.9) but every other sample unsure
    assert stats["unsure_rate"] == pytest.approx(5 / 8) and stats["label_agreement"] == 1.0
    assert stats["yes_rate"] == pytest.approx(2 / 8)
    loose, loose_stats = build_pairs(tokens, paths, scores=scores, threshold=0.5)  # without: b pairs 4 with 5 (0.3)
    assert [(p["prompt"], p["chosen"][0], p["rejected"][0]) for p in loose] == [("a", 1, 3), ("b", 4, 5)]
    assert loose_stats["unsure_rate"] == 0.0 and loose_stats["label_agreement"] == pytest.approx(7 / 8)  # a's 0.6
    for bad in (0.8, 0.9):
        with pytest.raises(ValueError, match="reject_threshold"):
            build_pairs(tokens, paths, scores=scores, threshold=0.8, reject_threshold=bad)
    sweep = threshold_sweep(tokens, paths, scores, thresholds=(0.5, 0.8), reject_thresholds=(None, 0.2, 0.6))
    assert [(r["threshold"], r["reject_threshold"]) for r in sweep] == [(0.5, None), (0.5, 0.2), (0.8, None),
                                                                        (0.8, 0.2), (0.8, 0.6)]
    assert sweep[3]["pairs"] == 1 and sweep[3]["pair_agreement"] == 1.0 and sweep[0]["pairs"] == 2

def test_pairs_file_passes_the_pairs_suite(tmp_path):
    from cotgen.pipeline.validation import DataValidationError, validate

    tokens, paths = labelled({"a photo of a red circle": [True, False]}, width=16)
    pairs, _ = build_pairs(tokens, paths)
    pairs[0]["metadata"] = {"tag": "colors", "prompt": "a photo of a red circle",
                            "include": [{"class": "circle", "count": 1, "color": "red"}]}
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    assert read_pairs(tmp_path / "pairs.jsonl") == pairs
    validate("pairs", tmp_path / "pairs.jsonl", root=tmp_path, vocab_size=32)
    write_pairs(tmp_path / "bad.jsonl", [{**pairs[0], "rejected": pairs[0]["chosen"]}])
    with pytest.raises(DataValidationError, match="chosen_equals_rejected"):
        validate("pairs", tmp_path / "bad.jsonl", root=tmp_path, vocab_size=32)


@pytest.fixture(scope="module")
def gen():
    return tiny_generator()


@pytest.fixture(scope="module")
def random_pairs(gen):
    g = torch.Generator().manual_seed(1)
    return [{"prompt": p, "chosen": torch.randint(0, gen.codebook_size, (gen.num_image_tokens,), generator=g).tolist(),
             "rejected": torch.randint(0, gen.codebook_size, (gen.num_image_tokens,), generator=g).tolist()}
            for p in PROMPTS]


def test_trl_logps_equal_image_logprobs(gen, random_pairs, tmp_path):
    """The log-probabilities trl's DPOTrainer computes (its own collator and fused head,
    reference = adapters disabled) are ShapesGenerator.image_logprobs: text logits masked."""
    policy = ShapesGenerator(__import__("copy").deepcopy(gen.model), gen.text_tokenizer, gen.image_tokenizer, 12)
    trainer = build_trainer(policy, random_pairs, dpo_config(tmp_path, steps=1, batch_size=2, progress=False),
                            lora_config(2, 4))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(random_pairs))])
    assert batch["input_ids"].shape == (2 * len(random_pairs), gen.sequence_length)  # no padding, no truncation
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    with torch.no_grad():
        expect_c = gen.image_logprobs(PROMPTS, torch.tensor([p["chosen"] for p in random_pairs]))
        expect_r = gen.image_logprobs(PROMPTS, torch.tensor([p["rejected"] for p in random_pairs]))
    torch.testing.assert_close(chosen, expect_c, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(rejected, expect_r, rtol=1e-5, atol=1e-3)
    # without the mask trl would normalise over text ids too, and the two would differ
    unmask_text_logits(trainer.model.get_base_model())
    unmasked, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    assert (unmasked - expect_c).abs().max() > 1.0
    mask_text_logits(trainer.model.get_base_model(), gen.text_vocab)
    assert "bias" not in trainer.model.get_base_model().lm_head.state_dict()  # never saved


def test_dpo_lowers_the_loss_and_raises_the_margin(gen, random_pairs, tmp_path):
    before = pair_logprob_margin(gen, random_pairs)
    aligned, metrics = train_dpo(gen, random_pairs, tmp_path, heldout=random_pairs[:2], steps=4, batch_size=4,
                                 learning_rate=5e-3, lora_rank=4, lora_alpha=8, progress=False)
    assert metrics["steps"] == 4 and metrics["pairs"] == 4
    assert metrics["first_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert metrics["last_loss"] < metrics["first_loss"] and metrics["last_margin"] > 0
    assert metrics["heldout"]["rewards/margins"] > 0
    after = pair_logprob_margin(aligned, random_pairs)
    assert (after > before).all()  # chosen-minus-rejected log-likelihood went up on every pair
    np.testing.assert_allclose(pair_logprob_margin(gen, random_pairs), before)  # the input generator is untouched
    # saved: merged generator (loadable, scores like the adapted model) and the adapter alone
    assert metrics["merge_max_abs_diff"] < 1e-3
    reloaded = ShapesGenerator.from_pretrained(tmp_path / "generator")
    np.testing.assert_allclose(pair_logprob_margin(reloaded, random_pairs), after, rtol=1e-5)
    assert "bias" not in reloaded.model.lm_head.state_dict() and reloaded.model.lm_head.bias is None
    assert reloaded.model.config.pad_token_id is None
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["r"] == 4


def test_merged_adapter_gives_the_adapted_outputs(gen):
    from peft import LoraConfig, get_peft_model

    model = __import__("copy").deepcopy(gen.model)
    mask_text_logits(model, gen.text_vocab)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))  # random, non-zero adapters
    seq = gen.sequences(gen.encode_prompts(PROMPTS), torch.randint(0, gen.codebook_size, (4, gen.num_image_tokens)))
    with torch.no_grad():
        adapted = peft_model(input_ids=seq).logits[..., gen.text_vocab :]
        with peft_model.disable_adapter():
            base = peft_model(input_ids=seq).logits[..., gen.text_vocab :]
        merged = peft_model.merge_and_unload()(input_ids=seq).logits[..., gen.text_vocab :]
    assert (adapted - base).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_align_stages_on_the_tiny_profile(tiny_run, tmp_path, monkeypatch):
    from cotgen.pipeline.stages import PATHS, run_stage

    src, params, _ = tiny_run
    root = tmp_path / "root"
    shutil.copytree(src / "data", root / "data")
    # a 5-step tiny generator draws nothing the evaluator accepts: label samples alternately instead
    monkeypatch.setattr("cotgen.reward.data.label_images",
                        lambda detector, images, metas: [(i % 2 == 0, "test") for i in range(len(images))])
    stats = run_stage("pairs_dpo", params, root)
    n = params["align"]["pairs"]["num_prompts"]
    assert stats["pairs"] == stats["prompts"] >= n - 6 and stats["heldout_pairs"] >= 1
    pairs = read_pairs(root / PATHS["dpo_pairs"])
    assert all(p["chosen_correct"] and not p["rejected_correct"] for p in pairs)
    metrics = run_stage("dpo", params, root)
    assert metrics["steps"] == params["align"]["dpo"]["steps"] and metrics["merge_max_abs_diff"] < 1e-3
    out = root / PATHS["dpo_generator"]
    assert ShapesGenerator.from_pretrained(out).model.config.vocab_size == ShapesGenerator.from_pretrained(
        root / PATHS["generator"]).model.config.vocab_size
    assert (out / "adapter/adapter_config.json").is_file() and (out / "train_log.json").is_file()
    assert (root / "metrics/align_dpo.json").is_file()
    run_stage("sample_dpo", params, root)
    summary = run_stage("score_dpo", params, root)
    geneval = json.loads((root / "metrics/geneval_dpo.json").read_text())
    assert {"overall", "tags", "images", "prompts", "n"} <= set(geneval) and geneval["overall"] == summary["overall"]
    assert geneval["images"] == geneval["prompts"] * params["evaluation"]["images_per_prompt"]
    assert (root / "plots/dpo_samples.png").is_file() and (root / "plots/geneval_dpo.png").is_file()
    # iterative round 2: samples of the round-1 generator; no prompt with both labels -> no-op round
    monkeypatch.setattr("cotgen.reward.data.label_images",
                        lambda detector, images, metas: [(False, "test")] * len(images))
    with pytest.warns(UserWarning, match="no preference pairs"):
        assert run_stage("pairs_dpo_iter", params, root)["pairs"] == 0
    noop = run_stage("dpo_iter", params, root)
    assert noop["steps"] == 0 and "unchanged" in noop["note"]
    assert ShapesGenerator.from_pretrained(root / PATHS["dpo_iter_generator"]) is not None
    # PARM-guided: pairs ranked by the judge (tiny profile: ranking only)
    monkeypatch.undo()
    stats = run_stage("pairs_parm_dpo", params, root)
    assert stats["labels"] == "judge" and stats["pairs"] >= 1
    assert all(p["chosen_score"] > p["rejected_score"] for p in read_pairs(root / PATHS["parm_dpo_pairs"]))
    assert run_stage("parm_dpo", params, root)["steps"] == params["align"]["dpo"]["steps"]
