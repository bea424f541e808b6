import pytest

from embeddings.record_bank import RecordBank
from llm_bridge.encoder import TextEncoder
from llm_bridge.tiny import tiny_llama
from recsys_tapper.baselines.rag import HEADER, query_text, rag_question, rag_samples, run_rag, select_records
from recsys_tapper.data import LampExample, ProfileRecord
from recsys_tapper.evaluation import rating_report
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.model import TapperModel
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex

TASK = get_task("movielens")
MOVIES = ["Casablanca (1942) | Drama, Romance", "Heat (1995) | Action", "Toy Story (1995) | Animation",
          "Alien (1979) | Horror, Sci-Fi", "Fargo (1996) | Crime", "Clueless (1995) | Comedy",
          "Babe (1995) | Children's", "Se7en (1995) | Thriller"]


def _example(question_movie="Casablanca Returns (1955) | Drama"):
    profile = tuple(ProfileRecord(f"u_{j}", {"text": m, "score": str(1 + j % 5)}, float(10 * j))
                    for j, m in enumerate(MOVIES))
    return LampExample("u_q", "u", f"Rate the movie from 1 to 5. movie: {question_movie}", profile, 100.0, "4",
                       {"item_id": "q"})


def test_recency_picks_the_4_latest_oldest_first():
    got = select_records(_example(), TASK, 4, "recency")
    assert [r.id for r in got] == ["u_4", "u_5", "u_6", "u_7"]
    text = rag_question(_example(), TASK, 4, "recency")
    lines = text.split("\n")
    assert lines[0] == HEADER
    assert lines[1:5] == [f"- {TASK.record_text(r.fields)}" for r in got]
    assert lines[-1] == _example().input  # the question comes last, unchanged


def test_bm25_picks_the_record_sharing_query_words():
    ex = _example()
    assert query_text(ex, TASK) == "Casablanca Returns (1955) | Drama"  # instruction stripped
    got = select_records(ex, TASK, 4, "bm25")
    assert "u_0" in [r.id for r in got]  # Casablanca: the only record with 'casablanca' and 'drama'
    assert len(got) == 4 and [r.date for r in got] == sorted(r.date for r in got)
    top1 = select_records(ex, TASK, 1, "bm25")
    assert [r.id for r in top1] == ["u_0"]
    assert "Casablanca (1942) | Drama, Romance rating: 1" in rag_question(ex, TASK, 4, "bm25")
    # another query word: 'Alien' retrieves the Alien record first
    assert [r.id for r in select_records(_example("Alien 2 (1986) | Horror"), TASK, 1, "bm25")] == ["u_3"]


def test_bm25_without_any_overlap_falls_back_to_the_latest():
    got = select_records(_example("Zzyzx (2001) | Western"), TASK, 2, "bm25")
    assert [r.id for r in got] == ["u_6", "u_7"]


def test_long_fields_are_cut_but_the_label_is_kept():
    profile = (ProfileRecord("u_0", {"text": "x" * 500, "score": "5"}, 1.0),)
    ex = LampExample("q", "u", "Rate the movie from 1 to 5. movie: y", profile, 2.0, "3")
    text = rag_question(ex, TASK, 4, "recency", max_record_chars=20)
    assert f"- {'x' * 20}... rating: 5" in text
    with pytest.raises(ValueError, match="unknown RAG method"):
        select_records(ex, TASK, 4, "dense")


def _fb(max_prompt_tokens):
    lm, tok = tiny_llama()
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), TASK, RecordBank(lm.config.hidden_size), UserIndex(["u"]),
                        max_prompt_tokens=max_prompt_tokens)
    return lm, fb


def test_rag_samples_fit_the_prompt_budget_and_keep_the_question():
    _, fb = _fb(max_prompt_tokens=150)  # the tiny tokenizer is one token per character
    ex = _example()
    full = rag_question(ex, TASK, 4, "recency")
    assert len(full) > 150
    (s,) = rag_samples(fb, [ex], k=4, method="recency")
    assert len(s.question) <= 150 and s.question.endswith(ex.input) and s.question.startswith(HEADER)
    assert s.history_rows == [] and s.answer == "4"
    _, big = _fb(max_prompt_tokens=1000)
    assert rag_samples(big, [ex], k=4, method="recency")[0].question == full


def test_run_rag_scores_through_the_stage1_path():
    lm, fb = _fb(max_prompt_tokens=400)
    rows = run_rag(TapperModel(lm, None, None), fb, [_example(), _example("Heat 2 (2000) | Action")],
                   "rag_recency_k4")
    assert [r["id"] for r in rows] == ["u_q", "u_q"] and all(r["pred"] in TASK.labels for r in rows)
    assert rating_report(rows)["mae"] == pytest.approx(
        sum(abs(int(r["pred"]) - int(r["gold"])) for r in rows) / len(rows))
