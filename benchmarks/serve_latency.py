"""serve_latency: time to first token and time per answer on SmolLM2, batch 1, one process, interleaved.

Three ways to answer the same MovieLens test questions with the same backbone:
  none    : the prompt alone (no personalization)
  tapper  : P_q pooled over the user's full history (record-term cache as when serving) + P_u row,
            projected to 8 soft tokens prepended to the prompt. The tower/projector are randomly initialised:
            latency does not depend on trained values.
  rag_k4  : the 4 most recent profile records written into the prompt (the Stage-1 RAG baseline's prompt).
Time to first token covers everything from the question to the first generated token: prompt building,
tokenization, (tapper) history (KJT + day gaps) + pooling + projection, and the prefill. Time per answer generates
``--new-tokens`` greedy tokens with a KV cache.

    python benchmarks/serve_latency.py --questions 40
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, median, run_meta, write_section
from embeddings.record_bank import RecordBank
from llm_bridge.backbone import BackboneConfig, load_backbone
from llm_bridge.encoder import TextEncoder
from llm_bridge.generation import greedy_generate
from llm_bridge.inject import prepend_prefix
from recsys_tapper.baselines.rag import rag_samples
from recsys_tapper.build import build_tapper
from recsys_tapper.config import RunConfig
from recsys_tapper.data import build_movielens_lamp, load_lamp
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.pipeline import select_users
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rag-max-prompt-tokens", type=int, default=192,
                    help="RAG prompts keep their 4 records whole up to this many tokens")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    test, _ = load_lamp(*build_movielens_lamp()["test"], task="movielens")
    users = select_users(test, None)[:: max(1, 943 // args.questions)][: args.questions]  # spread over activity
    first: dict[str, object] = {}
    for ex in test:  # each chosen user's first test question
        if ex.user_id in set(users):
            first.setdefault(ex.user_id, ex)
    questions = list(first.values())
    lm, tok = load_backbone(BackboneConfig())
    task = get_task("movielens")
    cfg = RunConfig()
    index = UserIndex(users)
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), task, RecordBank(lm.config.hidden_size), index)
    fb.register(questions)
    model = build_tapper(cfg.model, lm, len(index)).eval()
    with torch.no_grad():
        record_terms = model.tower.pooling.scorer.record_term(fb.bank.vectors)
    emb = lm.get_input_embeddings()
    samples = fb.question_samples(questions)
    fb_rag = FeatureBuilder(tok, fb.encoder, task, fb.bank, index, max_prompt_tokens=args.rag_max_prompt_tokens)
    rag = rag_samples(fb_rag, questions, k=4, method="recency")

    def answer(kind: str, i: int):
        with torch.no_grad():
            s = rag[i] if kind == "rag_k4" else samples[i]
            batch = (fb_rag if kind == "rag_k4" else fb).collate([s], with_labels=False)
            e = emb(batch.input_ids)
            prefix = model.prefix(batch, fb.bank.vectors, record_terms) if kind == "tapper" else None
            e, mask, _ = prepend_prefix(e, batch.attention_mask, None, prefix)
            return greedy_generate(lm, e, mask, args.new_tokens, eos_token_id=-1), e.shape[1]

    kinds = ["none", "tapper", "rag_k4"]
    for k in kinds:  # warm-up
        answer(k, 0)
    ttft = {k: [] for k in kinds}
    total = {k: [] for k in kinds}
    lengths = {k: [] for k in kinds}
    for i in range(len(samples)):
        order = kinds[i % 3 :] + kinds[: i % 3]
        for k in order:
            t0 = time.perf_counter()
            gen, n = answer(k, i)
            # first token: everything before the prefill returned, plus the prefill itself
            ttft[k].append((time.perf_counter() - t0 - gen.total_s + gen.first_token_s) * 1e3)
            total[k].append((time.perf_counter() - t0) * 1e3)
            lengths[k].append(n)
    res = {k: {"ttft_ms": round(median(ttft[k]), 2), "answer_ms": round(median(total[k]), 2),
               "median_input_positions": median(lengths[k])} for k in kinds}
    ratios_none = [a / b for a, b in zip(ttft["tapper"], ttft["none"])]
    ratios_rag = [a / b for a, b in zip(ttft["tapper"], ttft["rag_k4"])]
    payload = {
        "meta": run_meta(),
        "settings": {"backbone": "SmolLM2-135M-Instruct", "batch": 1, "questions": len(samples),
                     "new_tokens": args.new_tokens, "rag_max_prompt_tokens": args.rag_max_prompt_tokens, "slots": cfg.model.projector.slots, "threads": args.threads,
                     "median_history_records": median([len(s.history_rows) for s in samples])},
        "methods": res,
        "tapper_ttft_over_none": round(median(ratios_none), 3),
        "tapper_ttft_over_rag_k4": round(median(ratios_rag), 3),
        "targets": {"tapper_ttft_over_none_max": 1.5, "tapper_ttft_over_rag_k4_max": 0.5},
    }
    write_section(args.out, "serve_latency", payload)
    print(payload["methods"], payload["tapper_ttft_over_none"], payload["tapper_ttft_over_rag_k4"])


if __name__ == "__main__":
    main()
