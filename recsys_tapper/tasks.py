"""Task templates: how a profile record becomes record text, how a question becomes a prompt.

A task also says how a profile record turns into a training example (its input and label), which is how
Stage 2 trains on a user's own history: record i is the target, records 0..i-1 its visible history.

Example::

    task = get_task("movielens")
    task.record_text({"text": "Heat (1995) | Action", "score": "4"})   # 'Heat (1995) | Action rating: 4'
    task.prompt("Rate the movie from 1 to 5. movie: Heat (1995) | Action")  # '...\\nrating: '
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from recsys_tapper.data import LABEL_SETS

RATING, CLASSIFICATION, GENERATION = "rating", "classification", "generation"


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    record_template: str  # over profile fields, includes the label
    input_template: str | None  # profile record -> question input (None: profile records have no label)
    output_field: str | None
    prompt_suffix: str
    labels: tuple[str, ...] | None = None

    def record_text(self, fields: Mapping[str, str]) -> str:
        try:
            return self.record_template.format(**fields)
        except KeyError as e:
            raise KeyError(f"task {self.name}: profile record lacks field {e.args[0]!r}") from None

    def record_example(self, fields: Mapping[str, str]) -> tuple[str, str]:
        """A profile record as (question input, answer), for Stage-2 and Stage-1 training."""
        if self.input_template is None or self.output_field is None:
            raise ValueError(f"task {self.name}: profile records carry no label to train on")
        return self.input_template.format(**fields), str(fields[self.output_field]).strip()

    def prompt(self, question_input: str) -> str:
        return question_input + self.prompt_suffix


# Question inputs exactly as LaMP writes them: a Stage-1/Stage-2 example built from a profile record
# (``Task.record_example``) must read like the test questions it prepares for.
_REVIEW = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
           "without further explanation. review: {text}")
_MOVIE_TAGGING = ("Which tag does this movie relate to among the following tags? Just answer with the tag name "
                  f"without further explanation. tags: [{', '.join(LABEL_SETS['LaMP-2M'])}] description: "
                  "{description}")
_NEWS_CATEGORY = ("Which category does this article relate to among the following categories? Just answer with the "
                  f"category name without further explanation. categories: [{', '.join(LABEL_SETS['LaMP-2N'])}] "
                  "article: {text}")

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("movielens", RATING, "{text} rating: {score}", "Rate the movie from 1 to 5. movie: {text}", "score",
             "\nrating: ", LABEL_SETS["movielens"]),
        Task("LaMP-3", RATING, "review: {text} score: {score}", _REVIEW, "score", "\nscore: ", LABEL_SETS["LaMP-3"]),
        Task("LaMP-2M", CLASSIFICATION, "description: {description} tag: {tag}",
             _MOVIE_TAGGING, "tag", "\ntag: ",
             LABEL_SETS["LaMP-2M"]),
        Task("LaMP-2N", CLASSIFICATION, "article: {text} category: {category}",
             _NEWS_CATEGORY, "category", "\ncategory: ",
             LABEL_SETS["LaMP-2N"]),
        Task("LaMP-4", GENERATION, "article: {text} headline: {title}",
             "Generate a headline for the following article: {text}", "title", "\nheadline: "),
        Task("LaMP-5", GENERATION, "abstract: {abstract} title: {title}",
             "Generate a title for the following abstract of a paper: {abstract}", "title", "\ntitle: "),
        Task("LaMP-7", GENERATION, "tweet: {text}", None, None, "\ntweet: "),
        Task("LaMP-1", CLASSIFICATION, "title: {title} abstract: {abstract}", None, None, "\nanswer: ",
             LABEL_SETS["LaMP-1"]),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]
