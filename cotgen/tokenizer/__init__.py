"""Tokenizers: the VQ image tokenizer (:mod:`cotgen.tokenizer.vq`) and the word-level
text tokenizer (:mod:`cotgen.tokenizer.text`). Import the submodules directly."""
