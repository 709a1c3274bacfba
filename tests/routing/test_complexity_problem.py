"""The word-problem counts count what they claim to, on hand-written problems."""

from __future__ import annotations

from atajo.routing.complexity_problem import CUES, problem_counts, problem_features

PROBLEM = (
    "Maria bought 3 boxes of pencils for $4.50 each, and Tom bought twice as many boxes.  "
    "After a 20% discount, how much did they pay in total? How many boxes did Tom buy?"
)


def test_numbers_sentences_and_names() -> None:
    counts = problem_counts(PROBLEM)
    assert counts["numbers"] == 3  # 3, 4.50, 20 ("$" and "%" are cues, not numbers)
    assert counts["distinct_numbers"] == 3 and counts["decimals"] == 1
    assert counts["quantities"] == 4  # the three numbers and "twice"
    assert counts["sentences"] == 3 and counts["questions"] == 2
    assert counts["names"] == 2  # Maria, Tom; not "After" or "How", which open sentences
    assert counts["question_words"] == 6 and counts["question_numbers"] == 0  # "How many boxes did Tom buy"
    assert counts["commas"] == 2 and counts["ands"] == 1 and counts["dollar_signs"] == 1
    assert counts["max_digits"] == 2 and counts["large_numbers"] == 0


def test_operation_cues() -> None:
    counts = problem_counts(PROBLEM)
    assert counts["cue_twice"] == 1 and counts["cue_each"] == 1 and counts["cue_percent"] == 1
    assert counts["cue_price_change"] == 1 and counts["cue_total"] == 1 and counts["cue_money"] == 1
    assert counts["cue_condition"] == 1  # "after"
    assert counts["cue_half"] == counts["cue_average"] == counts["cue_unit"] == 0
    assert counts["cue_kinds"] == sum(1 for cue in CUES if counts["cue_" + cue])
    other = problem_counts(
        "A car drives 1,200 miles at 60 mph, then 3/4 of 80 km per hour. "
        "It left at 7:30. What percent of the trip remains, and how many more hours are left on average?"
    )
    assert other["numbers"] == 7  # 1,200 / 60 / 3 / 4 / 80 / 7 / 30: a fraction and a clock time are two each
    assert other["large_numbers"] == 1 and other["max_digits"] == 4
    assert other["cue_fraction"] == 1 and other["cue_time"] == 3  # 7:30, "hour", "hours"
    assert other["cue_speed"] == 2 and other["cue_per"] == 1  # "mph", "per hour"; "per"
    assert other["unit_kinds"] == 3 and other["cue_unit"] == 3  # miles, mph, km
    assert other["cue_what_share"] == 1 and other["cue_how_much_more"] == 1 and other["cue_average"] == 1
    assert other["cue_remain"] == 3  # "left" (twice), "remains"


def test_bins() -> None:
    found = problem_features("One two three four five six seven. " * 4)  # 28 words, 4 sentences, 7 words each
    assert {"m:words=1", "m:sentences=4", "m:words_per_sentence=1", "m:quantities=10+"} <= found
    assert "m:numbers=0" in problem_features("twice the numbers here")  # a number word, no digits
    assert "m:numbers=6-9" in problem_features("1 2 3 4 5 6 7")
    names = {f.split("=")[0] for f in problem_features("one")}
    assert names == {"m:" + name for name in problem_counts("")}  # every count has one bin
    assert problem_features("") == problem_features("Thanks, how are you?") == set()  # no number: no problem
    assert all(f.startswith("open|m:") for f in problem_features("1 + 1", prefix="open|m:"))
    huge = problem_counts("9" * 5000)  # beyond a float: counted as large, no digits count for it
    assert huge["numbers"] == huge["large_numbers"] == 1 and huge["max_digits"] == 0
