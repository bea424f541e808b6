"""TextEncoder's weighted mean and :func:`sif_weights`, against hand computations on the tiny model (its
tokenizer maps each character c to ``2 + ord(c) % 126``)."""

import pytest
import torch

from llm_bridge.encoder import TextEncoder, sif_weights
from llm_bridge.tiny import tiny_llama


def tid(c: str) -> int:
    return 2 + ord(c) % 126


@pytest.fixture(scope="module")
def lm_tok():
    return tiny_llama()


def test_sif_weights_by_hand(lm_tok):
    _, tok = lm_tok
    a = 0.1
    w = sif_weights(tok, ["ab", "ac", "ad"], 128, a=a)  # 6 tokens: "a" 3 times, b, c, d once each
    assert w.shape == (128,)
    assert w[tid("a")].item() == pytest.approx(a / (a + 3 / 6))
    for c in "bcd":
        assert w[tid(c)].item() == pytest.approx(a / (a + 1 / 6))
    assert w[tid("z")].item() == 1.0  # never seen: the largest weight
    assert w[tid("a")] < w[tid("b")]


def test_weighted_encode_by_hand_and_uniform_weights_give_the_mean(lm_tok):
    lm, tok = lm_tok
    e = lm.get_input_embeddings().weight.detach().float()
    w = torch.ones(128)
    w[tid("a")], w[tid("b")] = 0.2, 3.0
    got = TextEncoder(lm, tok, token_weights=w).encode(["ab", "b"])
    want_ab = (0.2 * e[tid("a")] + 3.0 * e[tid("b")]) / 3.2
    torch.testing.assert_close(got, torch.stack([want_ab, e[tid("b")]]))
    plain = TextEncoder(lm, tok).encode(["ab", "abc"])
    torch.testing.assert_close(plain, torch.stack([e[[tid("a"), tid("b")]].mean(0), e[[tid(c) for c in "abc"]].mean(0)]))
    torch.testing.assert_close(TextEncoder(lm, tok, token_weights=torch.ones(128)).encode(["ab", "abc"]), plain)
