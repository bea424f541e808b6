"""FeatureBuilder against hand-built token rows: answer-only labels, EOS only for non-rating tasks, prompt
truncation at ``max_prompt_tokens``, ``last_prompt``, and the ``max_history`` window of the sample builders.

The tiny tokenizer maps each character c to ``2 + ord(c) % 126`` (pad 0, EOS 1), so every row is written out
here from the strings alone.
"""

import math

import pytest
import torch

from embeddings.record_bank import RecordBank
from llm_bridge.encoder import TextEncoder
from llm_bridge.inject import IGNORE
from llm_bridge.tiny import tiny_llama
from recsys_tapper.data import LampExample, ProfileRecord
from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex

PAD, EOS = 0, 1


def ids(text: str) -> list[int]:
    return [2 + ord(c) % 126 for c in text]


@pytest.fixture(scope="module")
def lm_tok():
    return tiny_llama()


def _fb(lm_tok, task: str, max_prompt_tokens: int = 96, max_history: int | None = None) -> FeatureBuilder:
    lm, tok = lm_tok
    return FeatureBuilder(tok, TextEncoder(lm, tok), get_task(task), RecordBank(lm.config.hidden_size),
                          UserIndex(["u0", "u1"]), max_prompt_tokens, max_history)


def _sample(i: int, user: str, question: str, answer: str | None) -> Sample:
    return Sample(f"s{i}", user, [], [], None, question, answer)


def test_rating_collate_labels_the_answer_token_only_without_eos(lm_tok):
    fb = _fb(lm_tok, "movielens", max_prompt_tokens=3)
    suffix = "\nrating: "
    batch = fb.collate([_sample(0, "u0", "ab", "4"), _sample(1, "u1", "abcd", "2")])
    # "abcd" is cut to its first 3 tokens before the suffix; the answer follows the suffix directly
    row0 = ids("ab" + suffix + "4")  # 2 + 9 + 1 = 12 tokens
    row1 = ids("abc" + suffix + "2")  # 3 + 9 + 1 = 13 tokens
    assert batch.input_ids.tolist() == [row0 + [PAD], row1]
    assert batch.attention_mask.tolist() == [[1] * 12 + [0], [1] * 13]
    assert batch.labels.tolist() == [[IGNORE] * 11 + ids("4") + [IGNORE], [IGNORE] * 12 + ids("2")]
    assert batch.last_prompt.tolist() == [10, 11]  # the suffix's last token ("space"), read for the rating
    assert batch.input_ids[0, 10].item() == ids(" ")[0]
    assert batch.answers == ["4", "2"] and batch.ids == ["s0", "s1"] and batch.cold == [False, False]


def test_prompt_only_collate_has_no_labels_and_the_same_last_prompt(lm_tok):
    fb = _fb(lm_tok, "movielens", max_prompt_tokens=3)
    batch = fb.collate([_sample(0, "u0", "ab", "4"), _sample(1, "nobody", "abcd", "2")], with_labels=False)
    assert batch.labels is None
    assert batch.input_ids.tolist() == [ids("ab\nrating: ") + [PAD], ids("abc\nrating: ")]
    assert batch.last_prompt.tolist() == [10, 11]
    assert batch.cold == [False, True]  # an unknown user has no row


@pytest.mark.parametrize("task, suffix", [("LaMP-2M", "\ntag: "), ("LaMP-4", "\nheadline: ")])
def test_classification_and_generation_answers_end_with_eos(lm_tok, task, suffix):
    fb = _fb(lm_tok, task, max_prompt_tokens=2)
    batch = fb.collate([_sample(0, "u0", "xyz", "hi"), _sample(1, "u1", "q", "a")])
    p0, p1 = ids("xy" + suffix), ids("q" + suffix)
    r0, r1 = p0 + ids("hi") + [EOS], p1 + ids("a") + [EOS]
    t = len(r0)
    assert batch.input_ids.tolist() == [r0, r1 + [PAD] * (t - len(r1))]
    assert batch.labels.tolist() == [[IGNORE] * len(p0) + ids("hi") + [EOS],
                                     [IGNORE] * len(p1) + ids("a") + [EOS] + [IGNORE] * (t - len(r1))]
    assert batch.last_prompt.tolist() == [len(p0) - 1, len(p1) - 1]


def test_query_vectors_encode_the_whole_question_not_the_truncated_prompt(lm_tok):
    fb = _fb(lm_tok, "movielens", max_prompt_tokens=2)
    batch = fb.collate([_sample(0, "u0", "abcdef", "3")])
    torch.testing.assert_close(batch.q, fb.encoder.encode(["abcdef"]))
    assert not torch.allclose(batch.q, fb.encoder.encode(["ab"]))


def _example(user: str, n: int) -> LampExample:
    recs = tuple(ProfileRecord(f"r{i}", {"text": f"m{i}", "score": str(1 + i % 5)}, float(10 * i))
                 for i in range(n))
    return LampExample(f"{user}/q", user, "Rate the movie from 1 to 5. movie: q", recs, 100.0, "3")


@pytest.mark.parametrize("max_history, window", [(None, 5), (2, 2), (0, 0), (9, 5)])
def test_question_samples_keep_the_most_recent_max_history_records(lm_tok, max_history, window):
    fb = _fb(lm_tok, "movielens", max_history=max_history)
    ex = _example("u0", 5)
    fb.register([ex])
    (s,) = fb.question_samples([ex])
    rows = fb.bank.rows([f"u0/r{i}" for i in range(5)])
    assert s.history_rows == rows[5 - window :]
    assert s.history_days == [10.0 * i for i in range(5 - window, 5)]
    assert s.query_day == 100.0


@pytest.mark.parametrize("max_history", [None, 2, 0])
def test_profile_samples_see_only_earlier_records_cut_to_max_history(lm_tok, max_history):
    fb = _fb(lm_tok, "movielens", max_history=max_history)
    ex = _example("u0", 5)
    fb.register([ex])
    rows = fb.bank.rows([f"u0/r{i}" for i in range(5)])
    got = {s.id: s for s in fb.profile_samples([ex], min_history=1)}
    assert sorted(got) == [f"u0/r{i}" for i in range(1, 5)]  # record 0 has no earlier record
    for i in range(1, 5):
        s = got[f"u0/r{i}"]
        lo = 0 if max_history is None else i - min(i, max_history)  # first visible record
        assert s.history_rows == rows[lo:i]  # strictly before the target: no leakage of record i
        assert s.history_days == [10.0 * j for j in range(lo, i)]
        assert (s.query_day, s.answer, s.question) == (10.0 * i, str(1 + i % 5), f"Rate the movie from 1 to 5. movie: m{i}")


def test_record_label_weight_adds_the_label_embedding_to_the_record_vector():
    import torch

    from embeddings.record_bank import RecordBank
    from recsys_tapper.data import LampExample, ProfileRecord
    from recsys_tapper.features import FeatureBuilder
    from recsys_tapper.tasks import get_task
    from recsys_tapper.users import UserIndex

    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1]}

    class Enc:  # a text's vector: [its length, its count of "a"]
        def encode(self, texts, progress=False):
            return torch.tensor([[float(len(t)), float(t.count("a"))] for t in texts])

    ex = LampExample("q", "u", "?", (ProfileRecord("r1", {"description": "a cat", "tag": "drama"}, 1.0),))
    vectors = {}
    for w in (0.0, 2.0):
        fb = FeatureBuilder(Tok(), Enc(), get_task("LaMP-2M"), RecordBank(2), UserIndex(["u"]), label_weight=w)
        assert fb.register([ex]) == 1 and fb.register([ex]) == 0
        vectors[w] = fb.bank.vectors[0]
    text = "description: a cat tag: drama"  # the LaMP-2M record text: 29 characters, 5 "a"
    torch.testing.assert_close(vectors[0.0], torch.tensor([float(len(text)), 5.0]))
    torch.testing.assert_close(vectors[2.0], torch.tensor([29.0 + 2 * 5, 5.0 + 2 * 2]))  # + 2 x "drama"


def test_text_weighting_is_checked_and_sif_weights_come_from_profile_records_only():
    from recsys_tapper.data import LampExample, ProfileRecord
    from recsys_tapper.errors import InputError
    from recsys_tapper.features import text_weights

    class Tok:  # one id per character
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    task = get_task("movielens")
    ex = LampExample("q1", "u", "Rate: zzzz", (ProfileRecord("r1", {"text": "ab", "score": "5"}, 1.0),), output="4")
    with pytest.raises(InputError, match="model.text_weighting 'tfidf' is not one of mean, sif"):
        text_weights("tfidf", Tok(), task, [ex], 256)
    assert text_weights("mean", Tok(), task, [ex], 256) is None
    w = text_weights("sif", Tok(), task, [ex], 256)
    text = task.record_text(ex.profile[0].fields)  # "ab rating: 5"
    counts = {c: text.count(c) for c in text}
    for c, n in counts.items():
        assert math.isclose(float(w[ord(c)]), 1e-3 / (1e-3 + n / len(text)), rel_tol=1e-5)
    assert float(w[ord("z")]) == 1.0  # the question's characters are not counted
