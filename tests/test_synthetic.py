import json
from collections import Counter

import pytest

from recsys_tapper.data import LABEL_SETS, load_lamp
from recsys_tapper.synthetic import (
    GENRES,
    STYLES,
    SYNTHETIC_TASKS,
    TAG_CUES,
    apply_style,
    synthetic_headline_task,
    synthetic_rating_task,
    synthetic_tagging_task,
    write_synthetic,
)
from recsys_tapper.tasks import get_task


def _timeline(train, test, user):
    """A user's full training profile (from a test question) and their test questions."""
    te = [ex for ex in test if ex.user_id == user]
    return list(te[0].profile), te


def test_rating_task_keeps_its_signature_layout_and_determinism():
    train, test = synthetic_rating_task(n_users=3, n_records=10, n_test=2, seed=7)
    assert train == synthetic_rating_task(3, 10, 2, 7)[0]
    assert len(train) == 3 and len(test) == 6
    for ex in train:
        assert len(ex.profile) == 9
    for ex in test:
        assert len(ex.profile) == 10 and ex.date > ex.profile[-1].date
        assert ex.output in LABEL_SETS["movielens"]


def test_rating_drift_flips_every_taste():
    # noise is small (sd 0.3), so a record's rating says the sign of the taste applied to it
    train, test = synthetic_rating_task(n_users=6, n_records=60, n_test=2, seed=1, drift=True)
    half = 62 // 2
    flips = agree = 0
    for u in range(6):
        profile, _ = _timeline(train, test, f"syn{u}")
        early = {g: [] for g in GENRES}
        late = {g: [] for g in GENRES}
        for i, r in enumerate(profile):
            g = r.fields["text"].split("| ")[1]
            (late if i >= half else early)[g].append(int(r.fields["score"]) - 3)
        for g in GENRES:
            if early[g] and late[g]:
                e, lt = sum(early[g]) / len(early[g]), sum(late[g]) / len(late[g])
                flips += e * lt < 0
                agree += e * lt > 0
    assert flips > 10 and agree == 0


def _cued(description):
    return [t for t, cue in TAG_CUES.items() if cue in description]


def _majority_oracle(profile, description, window=None):
    """Predict the cued tag the user picked most often (in the last ``window`` records)."""
    counts = Counter(r.fields["tag"] for r in (profile[-window:] if window else profile))
    return max(_cued(description), key=lambda t: counts[t])


def test_tagging_plants_three_preferred_tags_per_user():
    train, test = synthetic_tagging_task(n_users=5, n_records=20, n_test=3, seed=0)
    task = get_task("LaMP-2M")
    for u in range(5):
        profile, questions = _timeline(train, test, f"syn{u}")
        golds = {r.fields["tag"] for r in profile} | {q.output for q in questions}
        assert len(golds) <= 3 and golds <= set(LABEL_SETS["LaMP-2M"])
        for r in profile:
            cued = _cued(r.fields["description"])
            assert len(cued) == 3 and r.fields["tag"] in cued
            assert len(set(cued) & golds) == 1  # exactly one cued tag is a preferred one
        for q in questions:
            assert q.input == task.input_template.format(description=q.input.split("description: ", 1)[1])
            assert q.extras["source"] == "SYNTHETIC"
    # personalization is learnable: a history-majority oracle is (almost) always right, a blind guess is 1/3
    hits = [_majority_oracle(q.profile, q.input) == q.output for q in test]
    assert sum(hits) / len(hits) >= 0.9


def test_tagging_drift_makes_old_history_mislead():
    _, test = synthetic_tagging_task(n_users=12, n_records=30, n_test=3, seed=3, drift=True)
    full = sum(_majority_oracle(q.profile, q.input) == q.output for q in test) / len(test)
    recent = sum(_majority_oracle(q.profile, q.input, window=8) == q.output for q in test) / len(test)
    # before the drift point the user liked 3 other tags, which now show up as distractors
    assert recent >= 0.9 and full < 0.85 and full < recent - 0.15


def _style(title, signature_words=("indeed", "folks", "sigh", "naturally", "allegedly", "again")):
    if title.startswith("BREAKING: "):
        return "breaking"
    if title.startswith("Watch: "):
        return "watch"
    if title.endswith(", sources say"):
        return "sources"
    if title.endswith(", explained"):
        return "explained"
    if title.split()[-1] in signature_words:
        return "signature"
    return None


def test_headline_habit_is_constant_without_drift_and_switches_with_it():
    train, test = synthetic_headline_task(n_users=6, n_records=12, n_test=2, seed=0)
    for u in range(6):
        profile, questions = _timeline(train, test, f"syn{u}")
        styles = {_style(r.fields["title"]) for r in profile} | {_style(q.output) for q in questions}
        assert len(styles) == 1 and None not in styles
    train, test = synthetic_headline_task(n_users=6, n_records=12, n_test=2, seed=0, drift=True)
    for u in range(6):
        profile, questions = _timeline(train, test, f"syn{u}")
        before = {_style(r.fields["title"]) for r in profile[:7]}
        after = {_style(r.fields["title"]) for r in profile[7:]} | {_style(q.output) for q in questions}
        assert len(before) == 1 and len(after) == 1 and before != after
    assert get_task("LaMP-4").record_example(profile[0].fields)[1] == profile[0].fields["title"]


def test_apply_style():
    assert [apply_style("Museum cancels summer festival", s, "sigh") for s in STYLES] == [
        "Museum cancels summer festival sigh", "BREAKING: Museum cancels summer festival",
        "Watch: Museum cancels summer festival", "Museum cancels summer festival, sources say",
        "Museum cancels summer festival, explained"]
    with pytest.raises(ValueError):
        apply_style("x", "emoji", "")


def test_every_headline_habit_changes_what_rouge_scores():
    """rouge-score lower-cases and drops punctuation: a habit must add words, or it scores like no habit."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    base = "Museum cancels summer festival"
    for style in STYLES:
        styled = apply_style(base, style, "sigh")
        assert scorer.score(styled, base)["rougeL"].fmeasure < 0.9, style


def test_write_synthetic_round_trips_through_the_lamp_loader(tmp_path):
    paths = write_synthetic(tmp_path, n_users=3, n_records=8, n_test=2, seed=0, drift=True)
    assert set(paths) == set(SYNTHETIC_TASKS) and all(name.startswith("SYNTHETIC") for name in paths)
    for name, splits in paths.items():
        spec = SYNTHETIC_TASKS[name]
        built = spec.build(n_users=3, n_records=8, n_test=2, seed=0, drift=True)
        for (split, (q, o)), expected in zip(sorted(splits.items()), built):
            assert split in ("dev", "test")
            assert json.loads(o.read_text())["task"] == name
            got, report = load_lamp(q, o, task=spec.layout)
            assert report.n_skipped_examples == 0 and len(got) == len(expected)
            assert [(e.id, e.output, e.profile) for e in got] == [(e.id, e.output, e.profile) for e in expected]
            assert all(e.extras["source"] == "SYNTHETIC" for e in got)
        manifest = json.loads((q.parent / "SYNTHETIC.json").read_text())
        assert manifest["synthetic"] is True and manifest["drift_at"] == 5 and manifest["layout"] == spec.layout


def test_drift_point_default_is_the_midpoint_and_drift_frac_counts_from_the_end():
    from recsys_tapper.synthetic import drift_point

    assert drift_point(30, 3, True) == 16 and drift_point(8, 2, True) == 5
    assert drift_point(20, 3, True, 0.25) == 15 and drift_point(20, 3, True, 0.0) == 20
    assert drift_point(20, 3, True, 1.0) == 0 and drift_point(30, 3, False) is None
    with pytest.raises(ValueError):
        drift_point(20, 3, False, 0.5)
    with pytest.raises(ValueError):
        drift_point(20, 3, True, 1.5)


def test_drift_frac_puts_the_last_fraction_of_the_profile_under_the_new_rule():
    train, test = synthetic_headline_task(n_users=4, n_records=20, n_test=2, seed=5, drift=True, drift_frac=0.25)
    for u in range(4):
        profile, questions = _timeline(train, test, f"syn{u}")
        styles = [_style(r.fields["title"]) for r in profile] + [_style(q.output) for q in questions]
        assert len(set(styles[:15])) == 1 and len(set(styles[15:])) == 1 and styles[14] != styles[15]
    # tagging: the last 5 of 20 profile records and the test golds come from the other 3 preferred tags
    train, test = synthetic_tagging_task(n_users=4, n_records=20, n_test=2, seed=5, drift=True, drift_frac=0.25)
    for u in range(4):
        profile, questions = _timeline(train, test, f"syn{u}")
        early = {r.fields["tag"] for r in profile[:15]}
        late = {r.fields["tag"] for r in profile[15:]} | {q.output for q in questions}
        assert len(early) == 3 and not early & late and len(late) <= 3
    # the default (drift_frac=None) keeps the midpoint schedule, record for record
    assert synthetic_rating_task(3, 10, 2, 7, drift=True) == synthetic_rating_task(3, 10, 2, 7, True, None)
    assert synthetic_rating_task(3, 10, 2, 7, drift=True) == synthetic_rating_task(3, 10, 2, 7, True, 0.4)
    assert synthetic_rating_task(3, 10, 2, 7, drift=True) != synthetic_rating_task(3, 10, 2, 7, True, 0.2)
