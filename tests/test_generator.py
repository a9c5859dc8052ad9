"""The AR generator and step-wise sampling, on tiny randomly initialised models of the
same classes (LlamaForCausalLM, VQTokenizer)."""

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, StaticCache

from cotgen.generator.model import ShapesGenerator
from cotgen.generator.sampling import SamplingConfig, StepwiseSampler, preallocated_cache, sample_images
from cotgen.tokenizer.text import build_text_tokenizer
from cotgen.tokenizer.vq import VQConfig, VQTokenizer

PROMPTS = ["a photo of a red circle left of a blue square", "a photo of three stars"]


def tiny_generator(seed: int = 0) -> ShapesGenerator:
    torch.manual_seed(seed)
    text = build_text_tokenizer()
    vq = VQTokenizer(VQConfig(channels=(8, 16, 16), codebook_size=32, embed_dim=4)).eval()
    cfg = ShapesGenerator.llama_config(len(text), vq.codebook_size, 12, vq.grid_size,
                                       hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64)
    model = LlamaForCausalLM(cfg).eval()
    # sharpen the random model a little so that samples depend on the prompt
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return ShapesGenerator(model, text, vq, prompt_len=12)


@pytest.fixture(scope="module")
def gen():
    return tiny_generator()


def run(gen, prompts, **kw):
    sampler = StepwiseSampler(gen, prompts, SamplingConfig(**kw))
    sampler.run()
    return sampler


def test_seed_determinism(gen):
    a = run(gen, PROMPTS, n=3, seed=1)
    b = run(gen, PROMPTS, n=3, seed=1)
    c = run(gen, PROMPTS, n=3, seed=2)
    assert [p.tokens for p in a.paths] == [p.tokens for p in b.paths]
    assert [p.tokens for p in a.paths] != [p.tokens for p in c.paths]
    assert all(len(p.tokens) == gen.num_image_tokens for p in a.paths)
    assert len({tuple(p.tokens) for p in a.paths}) == len(a.paths)  # candidates differ


def test_prompt_in_batch_gives_what_it_gives_alone(gen):
    alone = run(gen, PROMPTS[1:], n=2, seed=5, cfg_scale=3.0)
    batch = run(gen, PROMPTS, n=2, seed=5, cfg_scale=3.0)
    assert [p.tokens for p in alone.paths] == [p.tokens for p in batch.paths if p.prompt_index == 1]


@pytest.mark.parametrize("kind", ["preallocated", "static", "dynamic"])
@torch.no_grad()
def test_kv_cache_matches_recompute(gen, kind):
    seq = gen.prefix(gen.encode_prompts(PROMPTS))
    codes = torch.randint(0, gen.codebook_size, (2, 20)) + gen.text_vocab
    full = gen.model(input_ids=torch.cat([seq, codes], 1)).logits
    cache = {"preallocated": lambda: preallocated_cache(gen.model.config, gen.sequence_length),
             "static": lambda: StaticCache(config=gen.model.config, max_cache_len=gen.sequence_length),
             "dynamic": DynamicCache}[kind]()
    gen.model(input_ids=seq, cache=cache, use_cache=True)
    for t in range(codes.shape[1]):
        step = gen.model(input_ids=codes[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, full[:, seq.shape[1] + t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("other", ["dynamic", "static"])
def test_preallocated_cache_samples_what_library_caches_sample(gen, monkeypatch, other):
    """The sampler's preallocated KV cache changes speed, not codes: the same paths as
    with transformers' DynamicCache and StaticCache, across CFG, a drop midway and row
    selection."""
    import cotgen.generator.sampling as sampling

    def go():
        sampler = StepwiseSampler(gen, PROMPTS, SamplingConfig(n=3, seed=7, cfg_scale=2.0))
        for k in range(sampler.num_steps):
            sampler.step()
            if k == 3:
                sampler.drop([0, 4])
        return [p.tokens for p in sampler.paths]

    mine = go()
    make = {"dynamic": lambda config, max_cache_len: DynamicCache(),
            "static": lambda config, max_cache_len: StaticCache(config=config, max_cache_len=max_cache_len)}[other]
    monkeypatch.setattr(sampling, "preallocated_cache", make)
    assert go() == mine


def test_dropping_paths_midway(gen):
    full = run(gen, PROMPTS, n=3, seed=3, cfg_scale=2.0)
    sampler = StepwiseSampler(gen, PROMPTS, SamplingConfig(n=3, seed=3, cfg_scale=2.0))
    for _ in range(4):
        sampler.step()
    spent = sampler.paths[1].forward_passes
    sampler.drop([1, 4])
    assert [p.id for p in sampler.alive()] == [0, 2, 3, 5]
    sampler.run()
    dropped = sampler.paths[1]
    assert not dropped.alive and dropped.dropped_at_step == 4
    assert dropped.image_tokens == 4 * gen.grid_size and dropped.forward_passes == spent
    for p in sampler.paths:
        if p.alive:  # survivors are unaffected by their neighbours being dropped
            assert p.tokens == full.paths[p.id].tokens
            assert p.forward_passes == full.paths[p.id].forward_passes
    with pytest.raises(KeyError):
        sampler.drop([99])


def test_dropping_everything_stops(gen):
    sampler = StepwiseSampler(gen, PROMPTS[:1], SamplingConfig(n=2, seed=0))
    sampler.step()
    sampler.drop([0, 1])
    assert sampler.done
    with pytest.raises(RuntimeError, match="finished"):
        sampler.step()


def test_cfg_scale_zero_and_positive(gen):
    plain = run(gen, PROMPTS[:1], n=2, seed=0, cfg_scale=0.0)
    guided = run(gen, PROMPTS[:1], n=2, seed=0, cfg_scale=4.0)
    tokens = gen.num_image_tokens
    # no unconditional rows without guidance: 1 pass for the prefill, 1 per token but the last
    assert plain.paths[0].forward_passes == 1 + tokens - 1
    assert guided.paths[0].forward_passes == 2 * tokens
    assert [p.tokens for p in plain.paths] != [p.tokens for p in guided.paths]


@torch.no_grad()
def test_cfg_combines_cond_and_uncond(gen):
    sampler = StepwiseSampler(gen, PROMPTS[:1], SamplingConfig(n=1, seed=0, cfg_scale=1.5))
    cond = gen.model(input_ids=gen.prefix(gen.encode_prompts(PROMPTS[:1]))).logits[:, -1, gen.text_vocab :]
    uncond = gen.model(input_ids=gen.prefix(gen.null_prompts(1))).logits[:, -1, gen.text_vocab :]
    torch.testing.assert_close(sampler._guided(), cond + 1.5 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_preview_at_every_step(gen):
    sampler = StepwiseSampler(gen, PROMPTS[:1], SamplingConfig(n=2, seed=0))
    assert sampler.num_steps == gen.grid_size
    for k in range(sampler.num_steps):
        sampler.step()
        codes, known = sampler.token_grid()
        assert int(known[0].sum()) == (k + 1) * gen.grid_size
        images = sampler.images()
        assert len(images) == 2 and images[0].size == (64, 64) and images[0].mode == "RGB"
    # the final preview is the plain decode of the final tokens
    final = gen.decode(torch.tensor([sampler.paths[0].tokens]))[0]
    assert final.tobytes() == sampler.images([0])[0].tobytes()


def test_steps_parameter(gen):
    sampler = StepwiseSampler(gen, PROMPTS[:1], SamplingConfig(n=1, tokens_per_step=64))
    assert sampler.num_steps == gen.num_image_tokens // 64
    with pytest.raises(ValueError, match="tokens_per_step"):
        StepwiseSampler(gen, PROMPTS[:1], SamplingConfig(n=1, tokens_per_step=7))


@pytest.mark.parametrize("kw, message", [({"n": 0}, "n must be"), ({"temperature": 0}, "temperature"),
                                         ({"cfg_scale": -1}, "cfg_scale"), ({"top_k": -2}, "top_k")])
def test_bad_knobs(gen, kw, message):
    with pytest.raises(ValueError, match=message):
        StepwiseSampler(gen, PROMPTS[:1], SamplingConfig(**kw))


def test_out_of_vocabulary_prompts(gen):
    with pytest.raises(ValueError, match="'purplish', 'dog'"):
        StepwiseSampler(gen, ["a photo of a purplish dog"], SamplingConfig())
    with pytest.raises(ValueError, match="empty prompt"):
        gen.encode_prompts(["  "])


def test_save_load_round_trip(gen, tmp_path):
    gen.save_pretrained(tmp_path / "g")
    again = ShapesGenerator.from_pretrained(tmp_path / "g")
    codes = torch.randint(0, gen.codebook_size, (2, gen.grid_size, gen.grid_size))
    with torch.no_grad():
        torch.testing.assert_close(gen.image_logprobs(PROMPTS, codes), again.image_logprobs(PROMPTS, codes))
    a = run(gen, PROMPTS, n=2, seed=9, cfg_scale=2.0)
    b = run(again, PROMPTS, n=2, seed=9, cfg_scale=2.0)
    assert [p.tokens for p in a.paths] == [p.tokens for p in b.paths]
    with pytest.raises(FileNotFoundError, match="no generator"):
        ShapesGenerator.from_pretrained(tmp_path / "absent")


def test_top_k_one_is_greedy(gen):
    a = run(gen, PROMPTS[:1], n=2, seed=0, top_k=1)
    assert a.paths[0].tokens == a.paths[1].tokens


def test_sample_images_shapes(gen):
    images = sample_images(gen, PROMPTS, SamplingConfig(n=2, seed=0), batch_prompts=1)
    assert [len(row) for row in images] == [2, 2]


def test_rollout_from_prefix_continues_the_path(gen):
    """Greedy (top-k 1) roll-outs from a path's first step reproduce the path's rest."""
    full = run(gen, PROMPTS, n=1, top_k=1, cfg_scale=2.0, tokens_per_step=16)
    prefix = torch.tensor([p.tokens[:16] for p in full.paths])
    roll = StepwiseSampler(gen, PROMPTS, SamplingConfig(n=3, top_k=1, cfg_scale=2.0, tokens_per_step=16), prefix)
    assert roll.step_index == 1
    roll.run()
    for path in roll.paths:
        assert path.tokens == full.paths[path.prompt_index].tokens
        assert path.image_tokens == gen.num_image_tokens - 16
    with pytest.raises(ValueError, match="multiple of the step"):
        StepwiseSampler(gen, PROMPTS, SamplingConfig(n=1, tokens_per_step=16), prefix[:, :5])
