"""A tiny random Llama built in-process, for tests (2 layers, GQA on purpose; nothing downloaded)."""

from __future__ import annotations

import torch


class _CharTokenizer:
    """A minimal tokenizer with the Hugging Face call surface this project uses."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = 1
        self.pad_token_id = 0
        self.eos_token = "</s>"
        self.pad_token = "<pad>"

    def _ids(self, text: str) -> list[int]:
        return [2 + (ord(c) % (self.vocab_size - 2)) for c in text]

    def __call__(self, texts, add_special_tokens: bool = False, **_):
        if isinstance(texts, str):
            return {"input_ids": self._ids(texts)}
        return {"input_ids": [self._ids(t) for t in texts]}

    def convert_tokens_to_ids(self, tokens):
        return [self._ids(t)[0] for t in tokens]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        inv = {2 + (ord(c) % (self.vocab_size - 2)): c for c in "0123456789abcdefghijklmnopqrstuvwxyz .,:-|()"}
        return "".join(inv.get(int(i), "?") for i in ids if not (skip_special_tokens and int(i) in (0, 1)))


TINY_LAYERS = 2


def tiny_llama(hidden: int = 32, layers: int = TINY_LAYERS, vocab: int = 128, seed: int = 0):
    """Return ``(model, tokenizer)``: a frozen random LlamaForCausalLM and a char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=1, pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, _CharTokenizer(vocab)
