"""late_speed: the cached-trunk late prefix against the input-level prefix, side by side in one process.

On SmolLM2 and real MovieLens prompts (test questions of users spread over activity), with the same tower,
projector and bridge LoRA shape (random init: speed does not depend on trained values):

  train   : Stage-2 seconds per example (forward + backward + AdamW step, batches of 16, full histories) at
            ``--k`` (prefix at the input of layer k, trunk states cached) and at k = 0 (the paper's path).
  answer  : time to the label distribution of one question, batch 1 (prompt building, tokenization, history
            pooling and projection, the forward), for TAP-PER at k, TAP-PER at k = 0, the prompt alone
            (non-personalized) and the 4-most-recent-records RAG prompt. The trunk cache is warm for the
            TAP-PER-at-k question (its movie prompt was seen in training, as every MovieLens movie is).

Rounds are interleaved (each round times every method once, in rotating order); medians are reported.

    python benchmarks/late_speed.py --k 28 --train-steps 12 --questions 40 --full-eval
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
from llm_bridge.lora import add_lora, lora_parameters
from recsys_tapper.baselines.rag import rag_samples
from recsys_tapper.build import build_tapper, build_trunk
from recsys_tapper.config import RunConfig
from recsys_tapper.data import build_movielens_lamp, load_lamp
from recsys_tapper.evaluation import label_token_ids, predict_labels
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.model import TapperModel, TapperTrain
from recsys_tapper.pipeline import prefill_trunk, select_users
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=28)
    ap.add_argument("--train-steps", type=int, default=12)
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--full-eval", action="store_true", help="also time the full 4,715-query test evaluation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    test, _ = load_lamp(*build_movielens_lamp()["test"], task="movielens")
    users = select_users(test, None)[:: max(1, 943 // args.questions)][: args.questions]
    first: dict = {}
    for ex in test:
        if ex.user_id in set(users):
            first.setdefault(ex.user_id, ex)
    questions = list(first.values())
    lm, tok = load_backbone(BackboneConfig())
    task = get_task("movielens")
    index = UserIndex(users)
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), task, RecordBank(lm.config.hidden_size), index)
    fb.register(questions)
    train = fb.profile_samples(questions, per_user=None, seed=0)[: 16 * (args.train_steps + 2)]
    label_ids = label_token_ids(tok, task.labels)

    cfg_k, cfg_0 = RunConfig().model, RunConfig().model
    cfg_k.prefix_layer = args.k
    trunk = build_trunk(cfg_k, lm, None)
    samples = fb.question_samples(questions)
    t0 = time.perf_counter()
    prefill_trunk(trunk, fb, train, with_labels=True)
    prefill_trunk(trunk, fb, samples, with_labels=False)
    prefill_s = time.perf_counter() - t0
    n_prefilled = len(trunk)
    plm = add_lora(lm, cfg_k.bridge_lora, first_layer=args.k)
    late = build_tapper(cfg_k, plm, len(index), trunk=trunk, bank=fb.bank)
    plm.unload()
    plm0 = add_lora(lm, cfg_0.bridge_lora)
    full = build_tapper(cfg_0, plm0, len(index), bank=fb.bank)

    def train_s(model: TapperModel, lm_) -> float:
        """Median seconds per example over ``train_steps`` steps (2 warm-up steps not timed)."""
        params = [p for p in model.tower.parameters()] + list(model.projector.parameters()) + lora_parameters(lm_)
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        times = []
        for i in range(args.train_steps + 2):
            chunk = train[i * 16 : (i + 1) * 16]
            t = time.perf_counter()
            loss, _ = TapperTrain(model)(fb.collate(chunk))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= 2:
                times.append((time.perf_counter() - t) / len(chunk))
        model.eval()
        return median(times)

    # k = 0 uses plm0 (bridge LoRA on every layer); the late model's LoRA is re-added for its own timing
    s_full = train_s(full, plm0)
    plm0.unload()
    plm = add_lora(lm, cfg_k.bridge_lora, first_layer=args.k)
    late.lm = plm
    s_late = train_s(late, plm)

    fb_rag = FeatureBuilder(tok, fb.encoder, task, fb.bank, index, max_prompt_tokens=192)
    rag = rag_samples(fb_rag, questions, k=4, method="recency")
    base = TapperModel(lm, None, None)

    def answer(kind: str, i: int) -> None:
        with torch.no_grad():
            if kind == "rag_k4":
                base.label_probs(fb_rag.collate([rag[i]], with_labels=False), label_ids)
            elif kind == "none":
                base.label_probs(fb.collate([samples[i]], with_labels=False), label_ids)
            elif kind == "tapper_late":
                late.label_probs(fb.collate([samples[i]], with_labels=False), label_ids)

    kinds = ["none", "tapper_late", "rag_k4"]
    for k in kinds:
        answer(k, 0)
    ms = {k: [] for k in kinds}
    for i in range(len(samples)):
        for k in kinds[i % 3 :] + kinds[: i % 3]:
            t = time.perf_counter()
            answer(k, i)
            ms[k].append((time.perf_counter() - t) * 1e3)
    res = {k: round(median(v), 2) for k, v in ms.items()}
    full_eval = None
    if args.full_eval:
        index_all = UserIndex(select_users(test, None))
        fb_all = FeatureBuilder(tok, fb.encoder, task, fb.bank, index_all)
        fb_all.register(test)
        every = fb_all.question_samples(test)
        t = time.perf_counter()
        prefill_trunk(trunk, fb_all, every, with_labels=False, desc="trunk cache, every test query")
        fill_s = time.perf_counter() - t
        model_all = build_tapper(cfg_k, plm, len(index_all), trunk=trunk, bank=fb_all.bank)
        bs = RunConfig().trainer.eval_batch_size
        t = time.perf_counter()
        predict_labels(model_all, fb_all, every, task.labels, bs, desc="full test eval")  # eval mode, no_grad
        full_eval = {"queries": len(every), "users": len(index_all), "batch": bs,
                     "seconds": round(time.perf_counter() - t, 1), "trunk_fill_seconds": round(fill_s, 1)}
    payload = {
        "meta": run_meta(),
        "settings": {"backbone": "SmolLM2-135M-Instruct", "k": args.k, "n_layers": lm.config.num_hidden_layers,
                     "batch_train": 16, "train_steps_timed": args.train_steps, "answer_batch": 1,
                     "questions": len(samples), "threads": args.threads,
                     "median_history_records": median([len(s.history_rows) for s in samples]),
                     "median_train_history_records": median([len(s.history_rows) for s in train])},
        "train_s_per_example": {"k0": round(s_full, 4), f"k{args.k}": round(s_late, 4)},
        "train_speedup": round(s_full / s_late, 2),
        "trunk_prefill": {"sequences": n_prefilled, "seconds": round(prefill_s, 1)},
        "answer_ms": res,
        "tapper_late_over_none": round(res["tapper_late"] / res["none"], 3),
        "tapper_late_over_rag_k4": round(res["tapper_late"] / res["rag_k4"], 3),
        **({"full_test_eval": full_eval} if full_eval else {}),
        "targets": {"train_speedup_min": 8.0, **({"full_test_eval_max_s": 60.0} if full_eval else {})},
    }
    write_section(args.out, "late_prefix", payload)
    print(payload)


if __name__ == "__main__":
    main()
