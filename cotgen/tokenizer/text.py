"""Text tokenizer of the GenEval-Shapes world (issue 3).

A Hugging Face ``PreTrainedTokenizerFast`` over a closed, word-level vocabulary: every
word that GenEval's prompt templates can produce over the shapes world (articles,
"photo", "of", "and", shape names and their GenEval plurals, colours, number words and
relation words), plus special tokens. Words are split on whitespace; the prompt is
lower-cased and stripped first. Nothing is ever mapped to ``<unk>`` silently:
:func:`encode_prompt` raises ``ValueError`` naming every out-of-vocabulary word.

Special tokens (fixed ids, first in the vocabulary):

===========  ==  ===========================================
``<pad>``     0  padding
``<unk>``     1  present for the HF API only, never produced
``<boi>``     2  begin of image (the generator's image segment)
``<eoi>``     3  end of image
===========  ==  ===========================================

``encode_prompt`` returns the prompt's word ids only (no special tokens); the generator
decides where ``<boi>``/``<eoi>`` go.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer
from tokenizers import models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cotgen.world.prompts import make_plural
from cotgen.world.vocab import COLORS, NUMBERS, RELATIONS, SHAPES

PAD, UNK, BOI, EOI = "<pad>", "<unk>", "<boi>", "<eoi>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOI, EOI)

#: Template words of GenEval's six prompt generators.
TEMPLATE_WORDS: tuple[str, ...] = ("a", "an", "photo", "of", "and")


def world_words() -> list[str]:
    """Every word a GenEval-Shapes prompt can contain, in a fixed order (no duplicates).

    Template words, shapes, plurals (``make_plural``), colours, number words and the
    words of the relations (``"left of"`` -> ``"left"``, ``"of"``).
    """
    words: list[str] = []
    groups: Iterable[Iterable[str]] = (
        TEMPLATE_WORDS,
        SHAPES,
        (make_plural(s) for s in SHAPES),
        COLORS,
        NUMBERS,
        (w for rel in RELATIONS for w in rel.split()),
    )
    for group in groups:
        for w in group:
            if w not in words:
                words.append(w)
    return words


def build_text_tokenizer() -> PreTrainedTokenizerFast:
    """The world's word-level tokenizer.

    Returns a ``PreTrainedTokenizerFast`` with ``pad_token="<pad>"``, ``unk_token="<unk>"``
    and additional special tokens ``<boi>``, ``<eoi>`` (ids 0-3), then :func:`world_words`.
    Lower-cases and strips its input; splits on whitespace. Save and reload it with
    ``save_pretrained`` / ``PreTrainedTokenizerFast.from_pretrained``.
    """
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *world_words()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.Strip(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[BOI, EOI],
        model_max_length=64,
        padding_side="right",
    )


def oov_words(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[str]:
    """Words of ``prompt`` (lower-cased, whitespace-split) that are not in ``tokenizer``'s
    vocabulary, in order of first appearance; special tokens count as out of vocabulary."""
    vocab = tokenizer.get_vocab()
    out: list[str] = []
    for w in prompt.strip().lower().split():
        if (w not in vocab or w in SPECIAL_TOKENS) and w not in out:
            out.append(w)
    return out


def encode_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """Token ids of ``prompt``'s words (no special tokens), one id per word.

    The prompt is stripped and lower-cased, then split on whitespace.

    Raises:
        ValueError: the prompt is empty, or has words outside the vocabulary; the message
            names them (``words outside the GenEval-Shapes vocabulary: 'dog', 'purplish'``).
    """
    if not prompt.strip():
        raise ValueError("empty prompt")
    bad = oov_words(tokenizer, prompt)
    if bad:
        raise ValueError(
            "words outside the GenEval-Shapes vocabulary: " + ", ".join(repr(w) for w in bad)
        )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n_words = len(prompt.split())
    if len(ids) != n_words or tokenizer.unk_token_id in ids:  # defensive: never silently unk
        raise ValueError(f"prompt {prompt!r} did not tokenize to one known token per word: {ids}")
    return list(ids)


def decode_prompt(tokenizer: PreTrainedTokenizerFast, ids: Iterable[int]) -> str:
    """Words of ``ids`` joined by spaces, special tokens dropped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)
