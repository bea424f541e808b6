"""LaMP metrics against values computed by hand."""

import math

import pytest

from recsys_tapper.metrics import (
    classification_metrics,
    parse_rating,
    rating_metrics,
    rating_metrics_numeric,
    rouge_metrics,
)


def test_classification_macro_f1_over_the_whole_label_set():
    # a: tp=1 (0), fp=1 (3), fn=1 (1) -> F1 = 2/(2+1+1) = 0.5; b: tp=0 -> 0; c: never seen -> 0 but still averaged.
    # "x" is outside the set: wrong, and no label's true positive.
    m = classification_metrics([" a ", "b", "x", "a"], ["a", "a", "b", "b"], ["a", "b", "c"])
    assert m["accuracy"] == 0.25
    assert m["f1"] == pytest.approx(0.5 / 3)


def test_classification_two_labels_and_perfect():
    # [1]: P=1/2, R=1 -> F1=2/3; [2]: 0 -> macro 1/3
    m = classification_metrics(["[1]", "[1]"], ["[1]", "[2]"], ["[1]", "[2]"])
    assert m == {"accuracy": 0.5, "f1": pytest.approx(1 / 3)}
    assert classification_metrics(["[2]", "[1]\n"], ["[2]", "[1]"], ["[1]", "[2]"]) == {"accuracy": 1.0, "f1": 1.0}


def test_prediction_outside_label_set_is_wrong_even_if_equal_to_gold():
    assert classification_metrics(["x"], ["x"], ["a"]) == {"accuracy": 0.0, "f1": 0.0}


@pytest.mark.parametrize(("text", "value"), [("4", 4), (" 4.", 4), ("4 stars", 4), ("4.0", 4), ("1\n", 1),
                                             ("five", None), ("", None), ("7", None), ("45", None), ("4.5", None),
                                             ("0", None), ("rating: 4", None)])
def test_parse_rating(text, value):
    assert parse_rating(text) == value


def test_rating_metrics_unparsable_counts_as_the_farther_extreme():
    # "x" vs gold 4 counts as 1 (|4-1|=3 > |4-5|=1): errors 1, 3, 0
    m = rating_metrics(["1", "x", "5"], ["2", "4", "5"])
    assert m["mae"] == pytest.approx(4 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(10 / 3))
    assert m["unparsable_frac"] == pytest.approx(1 / 3)
    # gold 1 -> 5 (error 4), gold 3 -> tie, LaMP picks 5 (error 2), gold 5 -> 1 (error 4)
    m = rating_metrics(["?", "?", "?"], ["1", "3", "5"])
    assert (m["mae"], m["rmse"], m["unparsable_frac"]) == (pytest.approx(10 / 3), pytest.approx(math.sqrt(12)), 1.0)


def test_rating_metrics_rejects_bad_inputs():
    with pytest.raises(ValueError, match="gold rating 'six' is not an integer in 1..5"):
        rating_metrics(["4"], ["six"])
    with pytest.raises(ValueError, match="2 predictions but 1 golds"):
        rating_metrics(["4", "5"], ["4"])
    with pytest.raises(ValueError, match="no examples"):
        rating_metrics([], [])


def test_rating_metrics_numeric():
    m = rating_metrics_numeric([3.5, 5.0], [4, 3])  # errors -0.5, 2
    assert m == {"mae": 1.25, "rmse": pytest.approx(math.sqrt((0.25 + 4) / 2))}
    with pytest.raises(ValueError, match="finite"):
        rating_metrics_numeric([math.nan], [3])


def test_rouge_uses_stemming_and_lcs():
    # ex 1: P=3/3, R=3/4 -> F=6/7 for both; ex 2: cats/running stem to cat/run -> 1.0
    m = rouge_metrics(["the cat sat", "cats running"], ["the cat sat down", "cat runs"])
    assert m["rouge1"] == pytest.approx((6 / 7 + 1) / 2)
    assert m["rougeL"] == pytest.approx((6 / 7 + 1) / 2)
    # same words, different order: ROUGE-1 = 1, LCS "the cat" = 2 of 3 -> ROUGE-L = 2/3
    m = rouge_metrics(["sat the cat"], ["the cat sat"])
    assert (m["rouge1"], m["rougeL"]) == (pytest.approx(1.0), pytest.approx(2 / 3))
