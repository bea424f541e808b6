"""serve_latency: milliseconds per answer on SmolLM2 through the serving path, batch 1, one process, interleaved.

An answer is the label distribution over "1".."5" of one MovieLens test question: one
``TapperModel.label_probs`` forward, the one scoring path of evaluation and ``serve.Server`` (nothing is
generated). Four methods answer the same questions (each user's first test question, users spread over
activity):

  tapper       : ``Server.predict`` (user, question, date, item id) on a model directory written by
                 ``checkpoint.save_model``, as the training job writes it, for the shipped default config
                 (configs/demo.yaml: model smollm2 + task movielens, i.e. prefix at decoder layer 28 on a cached
                 trunk, 8 slots + 1 item slot, MF-shaped rows) and loaded by ``Server`` as ``tapper serve``
                 loads it. Task LoRA, tower, projector, item table and bridge LoRA are random (latency does not
                 depend on trained values). The history is the user's saved one (histories.parquet), in full.
                 Timed on the first call for that question: the server has not seen its prompt, so its trunk
                 (layers 0..k-1) runs and is cached (``trunk_misses`` counts the calls that really missed).
  tapper_warm  : the same ``Server.predict`` call again at once: the prompt's trunk states are cached and only
                 layers k..N-1 run (any later question on the same movie, by any user).
  none         : the non-personalized model: the saved backbone with the saved task LoRA merged, no tower
                 (``TapperModel(lm, None, None)``, as the job scores ``non_personalized``), through
                 ``evaluation.predict_labels`` at batch size 1 (``Server`` serves personalized model directories
                 only). The whole backbone runs on the prompt.
  rag_k4       : the same model and path on the RAG-recency-k4 prompt (``baselines.rag.rag_samples``: the 4 most
                 recent profile records written into the prompt, up to ``--rag-max-prompt-tokens``).

Each timed call covers the method's whole path from an answer request: for ``tapper`` the query checks, the
saved-history lookup, collation (tokenization, query vector, history KJT and day gaps, item KJT), pooling,
projection and the forward; for ``none`` / ``rag_k4`` collation of the prebuilt sample and the forward. Every
method is warmed up on a question that is not timed; then each question is answered by every method in
rotating order (``tapper`` and ``tapper_warm`` back to back). Reported: the median ms per answer and medians of
per-question ratios.

    python benchmarks/serve_latency.py --questions 40 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from benchmarks.common import RESULTS, median, run_meta, write_section
from embeddings.record_bank import RecordBank
from llm_bridge.backbone import load_backbone
from llm_bridge.encoder import TextEncoder
from llm_bridge.lora import add_lora, merge_lora
from recsys_tapper.baselines.rag import rag_samples
from recsys_tapper.build import build_tapper, prefix_slots
from recsys_tapper.checkpoint import save_model
from recsys_tapper.config import RunConfig
from recsys_tapper.data import LampExample, build_movielens_lamp, load_lamp
from recsys_tapper.evaluation import predict_labels
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.model import TapperModel
from recsys_tapper.pipeline import select_users
from recsys_tapper.serve import Server
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex
from recsys_tapper.warm_start import item_index

METHODS = ("none", "tapper", "tapper_warm", "rag_k4")
PATHS = {
    "tapper": "Server.predict -> TapperModel.label_probs (saved model dir; the question's trunk not cached yet)",
    "tapper_warm": "Server.predict -> TapperModel.label_probs (the same question again; its trunk cached)",
    "none": "evaluation.predict_labels(batch_size=1) -> TapperModel.label_probs (Stage-1 model, no tower)",
    "rag_k4": "evaluation.predict_labels(batch_size=1) -> TapperModel.label_probs (Stage-1 model, no tower, "
              "RAG-recency-k4 prompt)",
}


def default_config(overrides: Sequence[str] = ()) -> RunConfig:
    """The shipped default run config (configs/demo.yaml, composed as ``tapper demo`` composes it)."""
    from recsys_tapper.config import register
    from recsys_tapper.runner import compose_config, to_object

    register()
    return to_object(compose_config("demo", list(overrides)))


def write_model_dir(cfg: RunConfig, questions: Sequence[LampExample], out: str | Path, seed: int = 0) -> Path:
    """A model directory for ``cfg``, written by ``checkpoint.save_model`` from the parts the training job builds
    (``job.run_job``: task LoRA merged, bridge LoRA from ``prefix_layer``, ``build_tapper``, item index of the
    Stage-2 targets), all at their random init. Users: the questions' users; histories: their profiles.

    Example::

        write_model_dir(default_config(), questions, "/tmp/serve_model")   # then Server("/tmp/serve_model")
    """
    torch.manual_seed(seed)
    m = cfg.model
    lm, tok = load_backbone(m.backbone)
    users = UserIndex(list(dict.fromkeys(ex.user_id for ex in questions)))
    fb = FeatureBuilder(tok, TextEncoder(lm, tok, m.max_record_tokens), get_task(cfg.task.name),
                        RecordBank(lm.config.hidden_size), users, m.max_prompt_tokens, m.max_history)
    fb.register(list(questions))
    lm = add_lora(lm, m.task_lora)
    task_lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(lm).items()}
    lm = merge_lora(lm)
    plm = add_lora(lm, m.bridge_lora, first_layer=m.prefix_layer)
    items = item_index(fb.stage2_samples(list(questions))) if m.item_dim is not None else None
    model = build_tapper(m, plm, len(users), len(items or ()), bank=fb.bank)
    model.item_index = items
    return save_model(out, model, task_lora, users, fb.bank, cfg, histories=list(questions))


def stage1_model(server: Server) -> TapperModel:
    """The non-personalized model of the server's model directory: its backbone with the saved task LoRA
    merged, no tower, prefix at the input (the model the job scores as ``non_personalized``)."""
    lm, _ = load_backbone(server.cfg.model.backbone)
    lm = add_lora(lm, server.cfg.model.task_lora)
    set_peft_model_state_dict(lm, load_file(server.model_dir / "task_lora.safetensors"))
    return TapperModel(merge_lora(lm), None, None).eval()


def answer_fns(server: Server, base: TapperModel, questions: Sequence[LampExample],
               rag_max_prompt_tokens: int = 192) -> dict[str, Callable[[int], dict]]:
    """The timed function of each method: question index -> its answer (``tapper_warm`` is ``tapper`` called
    again). ``tapper``: ``Server.predict``'s dict; ``none`` / ``rag_k4``: ``predict_labels``' row."""
    fb = server.fb  # the server's prompts, so that none and tapper read the same tokens
    samples = fb.question_samples(questions)
    fb_rag = FeatureBuilder(server.tok, server.encoder, server.task, server.bank, server.users,
                            max_prompt_tokens=rag_max_prompt_tokens)
    rag = rag_samples(fb_rag, questions, k=4, method="recency")
    labels = server.task.labels

    def tapper(i: int) -> dict:
        q = questions[i]
        return server.predict(q.user_id, q.input, date=q.date, item_id=q.extras.get("item_id"))

    def none(i: int) -> dict:
        return predict_labels(base, fb, [samples[i]], labels, batch_size=1, desc="none")[0]

    def rag_k4(i: int) -> dict:
        return predict_labels(base, fb_rag, [rag[i]], labels, batch_size=1, desc="rag_k4")[0]

    return {"none": none, "tapper": tapper, "tapper_warm": tapper, "rag_k4": rag_k4}


def time_answers(fns: dict[str, Callable[[int], dict]], n: int, trunk=None, warmup: int = 0
                 ) -> tuple[dict[str, list[float]], int]:
    """Answer questions ``warmup..n-1`` with every method, rotating the order per question (``tapper`` then
    ``tapper_warm`` back to back); questions ``0..warmup-1`` warm every method up, untimed.
    Returns ({method: [ms per question]}, how many timed ``tapper`` calls ran the trunk)."""
    units = [("none",), ("tapper", "tapper_warm"), ("rag_k4",)]
    for i in range(warmup):
        for unit in units:
            for name in unit:
                fns[name](i)
    ms: dict[str, list[float]] = {name: [] for name in METHODS}
    misses = 0
    for j, i in enumerate(range(warmup, n)):
        for unit in units[j % 3 :] + units[: j % 3]:
            for name in unit:
                computed = trunk.n_computed if trunk is not None else 0
                t = time.perf_counter()
                fns[name](i)
                ms[name].append((time.perf_counter() - t) * 1e3)
                if name == "tapper" and trunk is not None and trunk.n_computed > computed:
                    misses += 1
    return ms, misses


def pick_questions(n: int) -> list[LampExample]:
    """The first test question of ``n`` users spread over activity (most active first)."""
    test, _ = load_lamp(*build_movielens_lamp()["test"], task="movielens")
    users = select_users(test, None)
    users = users[:: max(1, len(users) // n)][:n]
    first: dict[str, LampExample] = {}
    chosen = set(users)
    for ex in test:
        if ex.user_id in chosen:
            first.setdefault(ex.user_id, ex)
    return list(first.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=40, help="timed questions (one more warms up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rag-max-prompt-tokens", type=int, default=192,
                    help="RAG prompts keep their 4 records whole up to this many tokens")
    ap.add_argument("--model-dir", default=None, help="where to write the model directory (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = default_config()
    questions = pick_questions(args.questions + 1)  # the first (most active user) only warms up
    with tempfile.TemporaryDirectory(prefix="serve_latency_") as tmp:
        model_dir = write_model_dir(cfg, questions, args.model_dir or Path(tmp) / "model")
        server = Server(model_dir)
        base = stage1_model(server)
        fns = answer_fns(server, base, questions, args.rag_max_prompt_tokens)
        ms, misses = time_answers(fns, len(questions), server.model.trunk, warmup=1)
    timed = questions[1:]
    history = [len(server.records(ex.user_id)) for ex in timed]  # what each tapper answer pooled over
    m = cfg.model

    def ratio(a: str, b: str) -> float:
        return round(median([x / y for x, y in zip(ms[a], ms[b], strict=True)]), 3)

    payload = {
        "meta": run_meta(),
        "settings": {
            "backbone": "SmolLM2-135M-Instruct", "config": "configs/demo.yaml (model: smollm2, task: movielens)",
            "batch": 1, "questions": len(timed), "threads": args.threads, "prefix_layer": m.prefix_layer,
            "n_layers": server.model.lm.config.num_hidden_layers, "slots": m.projector.slots,
            "item_slots": m.item_slots if m.item_dim is not None else 0, "prefix_slots": prefix_slots(m),
            "max_prompt_tokens": m.max_prompt_tokens, "rag_max_prompt_tokens": args.rag_max_prompt_tokens,
            "median_history_records": median(history),
            "model_dir": "written by checkpoint.save_model (random init), loaded by serve.Server",
        },
        "paths": PATHS,
        "methods": {k: {"answer_ms": round(median(ms[k]), 2)} for k in METHODS},
        "trunk_misses": {"tapper": misses, "of": len(timed)},
        "tapper_over_none": ratio("tapper", "none"),
        "tapper_over_rag_k4": ratio("tapper", "rag_k4"),
        "tapper_warm_over_none": ratio("tapper_warm", "none"),
        "tapper_warm_over_rag_k4": ratio("tapper_warm", "rag_k4"),
        "targets": {"tapper_over_none_max": 1.5, "tapper_over_rag_k4_max": 0.5},
    }
    write_section(args.out, "serve_latency", payload)
    print({k: v["answer_ms"] for k, v in payload["methods"].items()}, payload["trunk_misses"],
          {k: payload[k] for k in ("tapper_over_none", "tapper_over_rag_k4", "tapper_warm_over_none",
                                   "tapper_warm_over_rag_k4")})


if __name__ == "__main__":
    main()
