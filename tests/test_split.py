"""split: stable, seeded subsets and the data metrics."""

from __future__ import annotations

import re
from typing import Any

import pandas as pd
import pytest

from stages import common, split, sync_manifest, sync_sources


def manifest_of(ids: list[str], duplicate_of: dict[str, str] | None = None) -> pd.DataFrame:
    """A minimal manifest: ids with duplicate flags."""
    duplicate_of = duplicate_of or {}
    return pd.DataFrame(
        {
            "id": ids,
            "duplicate": [image_id in duplicate_of for image_id in ids],
            "duplicate_of": [duplicate_of.get(image_id) for image_id in ids],
        }
    )


@pytest.fixture
def settings(params: dict[str, Any]) -> split.SplitParams:
    """The committed split params."""
    return split.SplitParams.from_params(params)


def test_adding_images_never_moves_an_existing_one(settings: split.SplitParams) -> None:
    ids = [f"20170512-{second:06d}" for second in range(2000)]
    before = split.assign_subsets(manifest_of(ids), settings)
    more = ids + [f"20180101-{second:06d}" for second in range(200)]  # 10% more
    after = split.assign_subsets(manifest_of(more), settings)
    merged = before.merge(after, on="id", suffixes=("_before", "_after"))
    assert len(merged) == 2000
    assert (merged["subset_before"] == merged["subset_after"]).all()


def test_the_demo_shares_are_within_two_points_of_the_proportions(
    settings: split.SplitParams,
) -> None:
    ids = sync_manifest.assign_ids(
        [item.relative_path for item in sync_sources.digits_source_files()]
    )
    shares = split.assign_subsets(manifest_of(ids), settings)["subset"].value_counts(normalize=True)
    for subset, proportion in settings.proportions.model_dump().items():
        assert abs(shares[subset] - proportion) <= 0.02, (subset, shares[subset])


def test_another_seed_gives_another_split(params: dict[str, Any]) -> None:
    ids = [f"image-{index}" for index in range(500)]
    first = split.assign_subsets(manifest_of(ids), split.SplitParams.from_params(params))
    params["split"]["seed"] = 7
    second = split.assign_subsets(manifest_of(ids), split.SplitParams.from_params(params))
    assert (first["subset"] != second["subset"]).mean() > 0.2


def test_a_duplicate_goes_where_its_original_goes(settings: split.SplitParams) -> None:
    ids = [f"image-{index}" for index in range(300)]
    duplicates = {f"image-{index}": "image-0" for index in range(1, 300)}
    subsets = split.assign_subsets(manifest_of(ids, duplicates), settings)["subset"]
    assert subsets.nunique() == 1


def test_near_copies_go_where_their_group_goes_whatever_their_ids(
    settings: split.SplitParams,
) -> None:
    ids = [f"image-{index:03d}" for index in range(300)]
    alone = split.assign_subsets(manifest_of(ids), settings).set_index("id")["subset"]
    # chains of near pairs, the copies' ids far apart in order and in the hash's ranges
    groups = [ids[start::60] for start in range(3)]
    pairs = pd.DataFrame(
        [(group[i], group[i + 1]) for group in groups for i in range(len(group) - 1)],
        columns=["id_a", "id_b"],
    )
    for group in groups:
        assert alone[group].nunique() > 1  # apart, the ids would land in several subsets
    subsets = split.assign_subsets(manifest_of(ids), settings, pairs).set_index("id")["subset"]
    for group in groups:
        assert subsets[group].nunique() == 1
        assert subsets[group[0]] == alone[group[0]]  # the group follows its first image
    others = [image_id for image_id in ids if not any(image_id in g for g in groups)]
    assert (subsets[others] == alone[others]).all()


def test_a_zero_share_leaves_its_subset_empty(params: dict[str, Any]) -> None:
    params["split"]["proportions"] = {"train": 0.8, "test": 0.2, "valid": 0}
    settings = split.SplitParams.from_params(params)
    subsets = split.assign_subsets(manifest_of([f"i{n}" for n in range(1000)]), settings)
    assert "valid" not in set(subsets["subset"])


def test_data_metrics_count_subsets_flags_and_rejects() -> None:
    manifest = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "blank": [True, False, False],
            "duplicate": [False, False, True],
            "taken_at": pd.to_datetime(["2017-05-12", None, None]),
            "latitude": [1.0, None, None],
            "label": ["x", None, "y"],
        }
    )
    subsets = pd.DataFrame({"id": ["a", "b", "c"], "subset": ["train", "train", "valid"]})
    rejected = pd.DataFrame({"path": ["bad.jpg"], "reason": ["empty file"]})
    assert split.data_metrics(manifest, rejected, subsets) == {
        "images": 3,
        "rejected": 1,
        "blank": 1,
        "duplicate": 1,
        "with_taken_at": 1,
        "with_location": 1,
        "with_label": 2,
        "subset_train": 2,
        "subset_test": 0,
        "subset_valid": 1,
    }


@pytest.mark.parametrize(
    ("proportions", "words"),
    [
        ({"train": 0.7, "test": 0.2, "valid": 0.2}, "the shares sum to 1.1; they must sum to 1"),
        ({"train": 0.7, "test": 0.3}, "expected shares for exactly train, test and valid"),
        ({"train": 1.2, "test": -0.1, "valid": -0.1}, "split.proportions.train = 1.2"),
        ({"train": "most", "test": 0.2, "valid": 0.1}, "split.proportions.train = 'most'"),
        ([0.7, 0.2, 0.1], "split.proportions = [0.7, 0.2, 0.1] is not allowed"),
    ],
)
def test_bad_proportions_give_one_line_naming_the_key(
    params: dict[str, Any], proportions: Any, words: str
) -> None:
    params["split"]["proportions"] = proportions
    with pytest.raises(common.UserError) as error:
        split.SplitParams.from_params(params)
    assert words in str(error.value)


def test_a_negative_seed_is_refused(params: dict[str, Any]) -> None:
    params["split"]["seed"] = -1
    with pytest.raises(common.UserError, match=re.escape("split.seed = -1 is not allowed")):
        split.SplitParams.from_params(params)


def test_is_among_answers_as_pandas_isin_does() -> None:
    ids = pd.Series([f"id-{n}" for n in range(50)], dtype="str")
    looked_up = pd.Series(["id-3", "gone", "id-49", "id-3"], dtype="str")
    expected = looked_up.isin(ids).to_numpy()
    assert common.is_among(looked_up, pd.Index(ids)).tolist() == expected.tolist()
    assert common.is_among(looked_up, {"id-49": 0}).tolist() == [False, False, True, False]
    numbers = pd.Series([1, 2, 3], dtype="int32")
    assert common.is_among(numbers, pd.Series([3, 1], dtype="int64")).tolist() == [
        True,
        False,
        True,
    ]
    assert common.is_among(looked_up.iloc[:0], pd.Index(ids)).tolist() == []
