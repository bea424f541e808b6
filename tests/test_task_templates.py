"""Prompts that match (issue 12, item 2): a training example built from a profile record reads like a question.

For the tasks whose LaMP profile records carry the label (2M, 2N, 3, 4, 5), Stage 1 and Stage 2 train on
(question-style prompt -> label) pairs built by ``Task.record_example``. The LaMP questions below are written
out by hand in LaMP's own wording, so a template that drifts from LaMP's format fails here.
"""

import re

import pytest

from recsys_tapper.data import LampExample, ProfileRecord
from recsys_tapper.pipeline import stage1_samples
from recsys_tapper.synthetic import synthetic_headline_task, synthetic_rating_task, synthetic_tagging_task
from recsys_tapper.tasks import get_task

# (task, a LaMP question input, a profile record with the same content, its label field)
LAMP_CASES = [
    ("LaMP-2M",
     ("Which tag does this movie relate to among the following tags? Just answer with the tag name without further "
     "explanation. tags: [sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, classic, "
     "psychology, fantasy, romance, thought-provoking, social commentary, violence, true story] description: "
     "A princess tours Rome incognito and falls for a reporter."),
     {"description": "A princess tours Rome incognito and falls for a reporter.", "tag": "romance"}, "tag"),
    ("LaMP-2N",
     ("Which category does this article relate to among the following categories? Just answer with the category "
     "name without further explanation. categories: [women, religion, politics, style & beauty, entertainment, "
     "culture & arts, sports, science & technology, travel, business, crime, education, healthy living, parents, "
     "food & drink] article: Beets are a nutritional powerhouse: they are full of vitamins."),
     {"text": "Beets are a nutritional powerhouse: they are full of vitamins.", "title": "Eat your beets",
      "category": "food & drink"}, "category"),
    ("LaMP-3",
     ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 without "
     "further explanation. review: One was broken and unusable."),
     {"text": "One was broken and unusable.", "score": "1"}, "score"),
    ("LaMP-4",
     "Generate a headline for the following article: The city council approved the new park budget on Monday.",
     {"text": "The city council approved the new park budget on Monday.", "title": "Council approves park budget"},
     "title"),
    ("LaMP-5",
     "Generate a title for the following abstract of a paper: We propose a prefix that personalizes a frozen LM.",
     {"title": "Personal prefixes", "abstract": "We propose a prefix that personalizes a frozen LM."}, "title"),
]
LABELLED_RECORD_TASKS = ("LaMP-2M", "LaMP-2N", "LaMP-3", "LaMP-4", "LaMP-5")


def _skeleton(text: str, fields: dict, slots) -> str:
    """``text`` with each content slot's value replaced by ``{slot}``: the template it was built from."""
    for name in slots:
        text = text.replace(fields[name], "{" + name + "}")
    return text


def test_every_task_with_labelled_records_is_covered():
    assert {c[0] for c in LAMP_CASES} == set(LABELLED_RECORD_TASKS)
    for name in LABELLED_RECORD_TASKS:
        assert get_task(name).input_template is not None


@pytest.mark.parametrize(("name", "question", "fields", "label_field"), LAMP_CASES, ids=[c[0] for c in LAMP_CASES])
def test_a_record_example_is_the_lamp_question_of_the_same_content(name, question, fields, label_field):
    task = get_task(name)
    prompt, answer = task.record_example(fields)
    assert prompt == question
    assert task.prompt(prompt) == task.prompt(question)
    assert answer == fields[label_field]
    slots = re.findall(r"{(\w+)}", task.input_template)
    assert label_field not in slots  # the label is the target, never in the prompt
    # same text apart from the content slots
    assert _skeleton(prompt, fields, slots) == _skeleton(question, fields, slots) == task.input_template


@pytest.mark.parametrize(("name", "question", "fields", "label_field"), LAMP_CASES, ids=[c[0] for c in LAMP_CASES])
def test_stage1_samples_from_records_read_like_the_questions(name, question, fields, label_field):
    """The Stage-1 sample built from a record (pipeline.stage1_samples) carries the question's prompt."""

    class _FB:  # stage1_samples reads only the builder's task
        task = get_task(name)

    ex = LampExample("q1", "other", question, (ProfileRecord("r1", fields, 1.0),), 2.0, fields[label_field])
    (s,) = stage1_samples(_FB, [ex], users=set(), n=1, seed=0)
    assert (s.question, s.answer) == (question, fields[label_field])


@pytest.mark.parametrize(("name", "make"), [("LaMP-2M", synthetic_tagging_task), ("LaMP-4", synthetic_headline_task),
                                            ("movielens", synthetic_rating_task)])
def test_synthetic_questions_are_the_record_examples_of_their_records(name, make):
    """A SYNTHETIC user's train question is built from the record that closes their test profile: the two
    must be the same (question -> answer) pair."""
    train, test = make(n_users=3, n_records=5, n_test=1, seed=0)
    task = get_task(name)
    for q in train:
        record = next(t for t in test if t.user_id == q.user_id).profile[-1]
        assert task.record_example(record.fields) == (q.input, q.output)
