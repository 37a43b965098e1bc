"""This project's byte-level tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json).

Token id = byte value 0..255, no merges, no special tokens: the tokenizer of a model trained here on
bytes (vocab_size in checkpoints.BYTE_VOCAB_SIZES), which hf.export_hf writes beside its weights.
The tokenizers package is imported inside write_byte_tokenizer only.
"""

from __future__ import annotations

import os

from gqa_uptrain import outputs


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that tokenizers' ByteLevel pre-tokenizer uses."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_byte_tokenizer(folder: str, model_max_length: int = 2048) -> None:
    """Writes tokenizer.json + tokenizer_config.json for this project's byte-level tokenizer:
    token id = byte value 0..255, no merges, no special tokens (ids >= 256 of a larger vocab are
    unused by it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    table = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(folder, "tokenizer.json"))
    outputs.write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False, "add_prefix_space": False})
