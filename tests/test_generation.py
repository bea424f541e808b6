import torch

from llm_bridge.generation import greedy_generate, left_pad
from llm_bridge.tiny import tiny_llama


def _naive(lm, ids, n):
    ids = ids.clone()
    out = []
    for _ in range(n):
        nxt = int(lm(input_ids=ids[None]).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt])])
    return out


def test_greedy_with_cache_and_left_padding_matches_naive_loop():
    lm, _ = tiny_llama()
    emb = lm.get_input_embeddings()
    a, b = torch.randint(2, 128, (5,)), torch.randint(2, 128, (9,))
    embeds, mask = left_pad([emb(a), emb(b)])
    gen = greedy_generate(lm, embeds, mask, max_new_tokens=6, eos_token_id=-1)
    with torch.no_grad():
        assert gen.tokens[0] == _naive(lm, a, 6)
        assert gen.tokens[1] == _naive(lm, b, 6)
    assert 0 < gen.first_token_s <= gen.total_s
