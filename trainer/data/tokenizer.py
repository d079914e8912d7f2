"""Byte-level BPE tokenizer trained on the training sentences only (nothing is downloaded)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# BART's special tokens, at BART's ids: bos 0, pad 1, eos 2, unk 3, mask 4.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A ``tokenizers`` tokenizer as a transformers tokenizer with BART's special tokens."""
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>", mask_token="<mask>")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Parameters
    ----------
    texts : list of str
        Training sentences only, so the test split's words stay unseen.
    vocab_size : int
        Upper bound; the BPE trainer stops earlier when the data supports no more merges.

    Returns
    -------
    PreTrainedTokenizerFast
        Encodes ``<s> ... </s>``; its vocabulary covers every byte, so no text is unknown.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return wrap(tokenizer)


def tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    """Rebuild a tokenizer saved with :func:`tokenizer_json`."""
    return wrap(Tokenizer.from_str(text))


def tokenizer_json(tokenizer: PreTrainedTokenizerFast) -> str:
    return tokenizer.backend_tokenizer.to_str()
