"""The zoo's character-level tokenizer: one token per character, built locally, no download.

Built with the ``tokenizers`` library (a WordLevel model over single characters) and wrapped
as a ``transformers`` fast tokenizer, so that it saves next to every zoo model and loads with
``AutoTokenizer.from_pretrained(model_dir)`` like any Hugging Face tokenizer. No BOS is added
when encoding: zoo models are trained on raw prompts, which is also what lm-eval feeds them.
"""

from __future__ import annotations

from pathlib import Path

# Two scripts for the same ten digit values: L1 ("0".."9") and the cipher L2 ("a".."j").
L1_DIGITS = "0123456789"
L2_DIGITS = "abcdefghij"
SCRIPTS = {"l1": L1_DIGITS, "l2": L2_DIGITS}

# Answer-script markers end every prompt: "=" asks for the answer in L1, ":" in L2.
MARKERS = {"l1": "=", "l2": ":"}

# Operation codes (upper case, so they never collide with the L2 digits) and separators.
OP_CHARS = "CRSPOXYZ+-*"
PUNCT = "=:|,;.?!#@ \n"

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
CHARS = L1_DIGITS + L2_DIGITS + OP_CHARS + PUNCT


def vocabulary() -> dict[str, int]:
    """Token → id: the four special tokens first, then one id per character (fixed order)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in CHARS:
        if ch in vocab:
            raise AssertionError(f"duplicate character {ch!r} in the zoo vocabulary")
        vocab[ch] = len(vocab)
    return vocab


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` over :func:`vocabulary`; decode joins characters back."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocabulary(), unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, "\n" too
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tok.padding_side = "left"  # generation pads on the left; training pads explicitly
    tok.model_max_length = 64
    return tok


def save_tokenizer(out_dir: str | Path) -> None:
    build_tokenizer().save_pretrained(str(out_dir))
