"""Data layer: LaMP-format files, MovieLens-100K as a LaMP-style rating task, and dates."""

from recsys_tapper.data.dates import DateParseError, format_date, parse_date
from recsys_tapper.data.lamp import (
    LABEL_SETS,
    LampExample,
    LampFormatError,
    LoadReport,
    ProfileRecord,
    canonical_task,
    label_set,
    load_lamp,
    required_fields,
    stage2_min_profile,
    write_lamp,
    write_predictions,
)
from recsys_tapper.data.movielens import (
    MovieLensFormatError,
    build_movielens_lamp,
    fetch_movielens,
    movie_text,
    read_movielens,
    split_movielens,
)

__all__ = [
    "LABEL_SETS",
    "DateParseError",
    "LampExample",
    "LampFormatError",
    "LoadReport",
    "MovieLensFormatError",
    "ProfileRecord",
    "build_movielens_lamp",
    "canonical_task",
    "fetch_movielens",
    "format_date",
    "label_set",
    "load_lamp",
    "movie_text",
    "parse_date",
    "read_movielens",
    "required_fields",
    "split_movielens",
    "stage2_min_profile",
    "write_lamp",
    "write_predictions",
]
