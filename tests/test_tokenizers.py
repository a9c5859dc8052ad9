"""Text tokenizer (closed GenEval-Shapes vocabulary) and VQ image tokenizer (issue 3)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cotgen.tokenizer.text import (
    BOI,
    EOI,
    PAD,
    build_text_tokenizer,
    decode_prompt,
    encode_prompt,
    world_words,
)
from cotgen.tokenizer.vq import (
    VQConfig,
    VQTokenizer,
    codebook_stats,
    pil_to_tensor,
    reconstruction_check,
    tensor_to_pil,
    train_vq_tokenizer,
)
from cotgen.world.prompts import build_shapes_eval_set, build_shapes_train_set
from cotgen.world.vocab import BACKGROUND_RGB

TINY = {"channels": [8, 16], "embed_dim": 4, "restart_every": 5}


@pytest.fixture(scope="module")
def eval_set():
    return build_shapes_eval_set()


# ----------------------------------------------------------------------- text
@pytest.fixture(scope="module")
def text_tok():
    return build_text_tokenizer()


def test_special_tokens(text_tok):
    ids = text_tok.convert_tokens_to_ids([PAD, BOI, EOI])
    assert ids == [0, 2, 3]
    assert text_tok.pad_token == PAD
    assert set(ids) <= set(text_tok.all_special_ids)


def test_every_prompt_encodes_one_id_per_word(text_tok, eval_set):
    prompts = eval_set + build_shapes_train_set(eval_set, 4000)
    words = set()
    for s in prompts:
        ids = encode_prompt(text_tok, s["prompt"])
        assert len(ids) == len(s["prompt"].split())
        assert text_tok.unk_token_id not in ids
        assert decode_prompt(text_tok, ids) == s["prompt"]
        words.update(s["prompt"].split())
    # the vocabulary covers every word that occurs and nothing exotic
    assert words <= set(world_words())
    assert {"two", "three", "four", "left", "right", "above", "below", "crosses"} <= words


def test_encode_normalises_case_and_space(text_tok):
    assert encode_prompt(text_tok, "  A Photo of  two RED circles ") == encode_prompt(
        text_tok, "a photo of two red circles"
    )


def test_oov_words_are_named(text_tok):
    with pytest.raises(ValueError, match=r"vocabulary: 'dog', 'purplish'$"):
        encode_prompt(text_tok, "a photo of a dog and a purplish dog")
    with pytest.raises(ValueError, match="'<boi>'"):
        encode_prompt(text_tok, "<boi> a photo of a star")
    with pytest.raises(ValueError, match="empty"):
        encode_prompt(text_tok, "   ")


def test_text_tokenizer_save_load_round_trip(text_tok, tmp_path, eval_set):
    text_tok.save_pretrained(tmp_path)
    for loaded in (PreTrainedTokenizerFast.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded.get_vocab() == text_tok.get_vocab()
        assert loaded.pad_token_id == text_tok.pad_token_id
        assert loaded.convert_tokens_to_ids([BOI, EOI]) == [2, 3]
        for s in eval_set[:50]:
            assert encode_prompt(loaded, s["prompt"]) == encode_prompt(text_tok, s["prompt"])
        with pytest.raises(ValueError, match="'dog'"):
            encode_prompt(loaded, "a photo of a dog")


# ----------------------------------------------------------------------- VQ
@pytest.fixture(scope="module")
def tiny_vq():
    model, metrics = train_vq_tokenizer(
        None, steps=30, batch_size=8, seed=0, codebook_size=64, progress=False, config=TINY,
        train_prompts=200, eval_images=32, warmup=5, lr=3e-3, num_threads=1,
    )
    return model, metrics


def test_vq_loss_drops(tiny_vq):
    _, m = tiny_vq
    hist = m["loss_history"]
    assert len(hist) == 10
    assert np.mean(hist[-3:]) < 0.8 * np.mean(hist[:2])
    assert 0 < m["codebook_usage"] <= 1 and 1 <= m["perplexity"] <= 64
    assert m["codebook_size"] == 64


def test_vq_training_is_deterministic():
    kw = dict(steps=3, batch_size=4, seed=3, codebook_size=32, progress=False, config=TINY,
              train_prompts=50, eval_images=0, num_threads=1)
    a, _ = train_vq_tokenizer(None, **kw)
    b, _ = train_vq_tokenizer(None, **kw)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
    arr[:, :32] = BACKGROUND_RGB
    return torch.from_numpy(arr)


def test_vq_shapes_and_dtypes(tiny_vq):
    model, _ = tiny_vq
    x = _images(3)
    tok = model.encode(x)
    assert tok.shape == (3, 16, 16) and tok.dtype == torch.int64
    assert int(tok.min()) >= 0 and int(tok.max()) < 64
    # float input in [-1, 1] gives the same tokens as uint8 input
    xf = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(model.encode(xf), tok)
    rec = model.decode(tok)
    assert rec.shape == (3, 3, 64, 64) and rec.dtype == torch.float32
    assert rec.min() >= -1 and rec.max() <= 1
    # flat raster tokens are accepted too
    assert torch.equal(model.decode(tok.view(3, 256)), rec)
    # PIL helpers
    pils = tensor_to_pil(xf)
    assert pils[0].size == (64, 64) and pils[0].mode == "RGB"
    assert torch.equal(pil_to_tensor(pils), x)
    assert torch.equal(model.encode_images(pils), tok)
    outs = model.decode_images(tok)
    assert len(outs) == 3 and outs[0].size == (64, 64)


def test_vq_input_errors(tiny_vq):
    model, _ = tiny_vq
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="dtype"):
        model.encode(torch.zeros(2, 64, 64, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"must be in \[0, 64\)"):
        model.decode(torch.full((1, 16, 16), 64))
    with pytest.raises(ValueError, match="shape"):
        model.decode(torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="64x64"):
        model.encode_images([Image.new("RGB", (32, 32))])


def test_vq_save_load_round_trip(tiny_vq, tmp_path):
    model, _ = tiny_vq
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config, VQConfig) and loaded.config.channels == TINY["channels"]
    x = _images(4, seed=1)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.background_tokens, model.background_tokens)
    # the training-only usage buffer is not saved; it must come back clean, not as garbage
    assert torch.equal(loaded.quantizer.usage, torch.ones(64))
    tok = model.encode(x)
    assert torch.equal(loaded.decode(tok), model.decode(tok))


def test_decode_partial_draws_background(tiny_vq):
    model, _ = tiny_vq
    blank = torch.tensor(BACKGROUND_RGB, dtype=torch.uint8).expand(1, 64, 64, 3)
    assert torch.equal(model.background_tokens, model.encode(blank)[0])
    tok = model.encode(_images(2, seed=2))
    garbage = tok.clone()
    garbage.view(2, -1)[:, 100:] = 0  # values past n_generated must not matter
    a = model.decode_partial(tok, 100)
    b = model.decode_partial(garbage, 100)
    assert torch.equal(a, b)
    expected = tok.clone().view(2, -1)
    expected[:, 100:] = model.background_tokens.view(-1)[100:]
    assert torch.equal(a, model.decode(expected.view(2, 16, 16)))
    # n_generated = 0 is the blank scene, 256 the full decode; per-image counts work
    blank_rec = model.decode(model.background_tokens[None].expand(2, 16, 16))
    assert torch.equal(model.decode_partial(tok, 0), blank_rec)
    assert torch.equal(model.decode_partial(tok, 256), model.decode(tok))
    per_image = model.decode_partial(tok, torch.tensor([0, 256]))
    assert torch.equal(per_image[0], blank_rec[0])
    assert torch.allclose(per_image[1], model.decode(tok)[1], atol=1e-5)
    # MaskGIT-style masks
    known = torch.zeros(16, 16, dtype=torch.bool)
    known[:4] = True
    assert torch.equal(model.decode_masked(tok, known), model.decode_partial(tok, 64))
    with pytest.raises(ValueError, match="n_generated"):
        model.decode_partial(tok, 257)


def test_codebook_stats():
    s = codebook_stats(torch.tensor([[0, 0, 1, 1]]), 4)
    assert s["codebook_usage"] == 0.5 and s["codes_used"] == 2
    assert s["perplexity"] == pytest.approx(2.0)


class NothingDetector:
    classnames = ("circle",)

    def detect(self, image):
        return {}


def test_reconstruction_check_runs(tiny_vq, eval_set):
    model, _ = tiny_vq
    out = reconstruction_check(model, NothingDetector(), eval_set[:3], images_per_prompt=2, progress=False)
    assert out["images"] == 6 and len(out["results"]) == 6
    assert out["geneval_overall"] == 0.0 and out["original_overall"] == 0.0
    assert set(out["tags"]) == {"single_object"}
    for k in ("codebook_usage", "perplexity", "codebook_size", "psnr", "lost"):
        assert k in out


def test_encode_snaps_plain_background_away_from_objects(tiny_vq):
    tok, _ = tiny_vq
    img = np.empty((1, 64, 64, 3), dtype=np.uint8)
    img[:] = BACKGROUND_RGB
    img[0, 24:40, 24:40] = (200, 30, 30)  # one red square: patches 6..9
    rng = np.random.default_rng(0)
    img[0, :, :8] = np.clip(img[0, :, :8].astype(int) + rng.integers(-20, 20, (64, 8, 3)), 0, 255)  # noisy strip
    codes = tok.encode(torch.from_numpy(img))
    raw = tok.encode(torch.from_numpy(img), snap_background=False)
    bg = tok.background_tokens
    g = tok.grid_size
    assert g == 16
    far = torch.zeros(g, g, dtype=torch.bool)
    far[:, 3:] = True  # 3x3 neighbourhood off the noisy strip (patch columns 0-1) ...
    far[5:11, 5:11] = False  # ... and off the square (patches 6-9) and its ring
    assert torch.equal(codes[0][far], bg[far])
    assert torch.equal(codes[0][~far], raw[0][~far])  # everything else keeps its own code
