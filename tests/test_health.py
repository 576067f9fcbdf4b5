"""Collection health: perceptual hashes, near-duplicate pairs and groups, quality flags,
nearest neighbours and the checks of latent vectors."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd
import pytest
from near_copies import COPY_KINDS, near_copy_files, planted_quality_files, scene
from PIL import Image, ImageOps

from stages import duplicates, health, image_health, near_search, neighbour_lists
from stages.sync_files import measure_image
from stages.sync_manifest import HEALTH_COLUMNS


def measured_manifest(files: dict[str, bytes]) -> pd.DataFrame:
    """A manifest of the files as sync measures them (ids are the names)."""
    rows = []
    for name, data in files.items():
        measurement = measure_image(data, 10**9)
        assert not isinstance(measurement, str), (name, measurement)
        rows.append(
            {
                "id": name,
                "path": name,
                "sha256": measurement.sha256,
                "bytes": measurement.bytes,
                "width": measurement.width,
                "height": measurement.height,
                "blank": measurement.health.pixel_std < 2.0,
                "pixel_std": measurement.health.pixel_std,
                **{column: getattr(measurement.health, column) for column in HEALTH_COLUMNS},
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def near_copies() -> tuple[pd.DataFrame, dict[str, str]]:
    files, truth = near_copy_files()
    return measured_manifest(files), truth


def pairs_within_groups(names: list[str], group_of: dict[str, Any]) -> set[frozenset[str]]:
    """Every pair of names that share a group."""
    members: dict[Any, list[str]] = {}
    for name in names:
        members.setdefault(group_of[name], []).append(name)
    return {
        frozenset(pair)
        for group in members.values()
        for pair in itertools.combinations(sorted(group), 2)
    }


def test_a_mirror_image_hashes_as_the_mirrored_hash() -> None:
    image = scene(3).convert("L")
    plain, mirrored = image_health.perceptual_hashes(image)
    flipped_plain, flipped_mirrored = image_health.perceptual_hashes(ImageOps.mirror(image))
    assert near_search.hash_distance(mirrored, flipped_plain) <= 2
    assert near_search.hash_distance(plain, flipped_mirrored) <= 2
    assert near_search.hash_distance(plain, flipped_plain) > 10


def groups_by_search(count: int, pairs: list[tuple[int, int]]) -> list[int]:
    """Each row's group, numbered by its smallest row, found by a plain graph search."""
    linked: dict[int, set[int]] = {row: set() for row in range(count)}
    for a, b in pairs:
        linked[a].add(b)
        linked[b].add(a)
    group = [-1] * count
    for start in range(count):  # rows in order: each group is met first at its smallest
        if group[start] < 0:
            group[start], pending = start, [start]
            while pending:
                for other in linked[pending.pop()]:
                    if group[other] < 0:
                        group[other] = start
                        pending.append(other)
    return group


@pytest.mark.parametrize("seed", range(6))
def test_groups_of_pairs_are_the_connected_components(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 300))
    pairs = [tuple(map(int, rng.integers(0, count, 2))) for _ in range(int(rng.integers(0, 400)))]
    chain = [(row + 1, row) for row in range(count - 1)][::-1] if seed == 0 else []  # one long path
    pairs += chain
    first = np.array([a for a, _ in pairs], np.int64)
    second = np.array([b for _, b in pairs], np.int64)
    groups = near_search.groups_of_pairs(count, first, second)
    assert groups.tolist() == groups_by_search(count, pairs)


def test_near_copies_are_grouped_and_look_alikes_are_not(near_copies) -> None:
    manifest, truth = near_copies
    pairs, _ = duplicates.hash_pair_table(manifest, limit=8, workers=2)
    row_of = {name: row for row, name in enumerate(manifest["id"])}
    groups = near_search.groups_of_pairs(
        len(manifest),
        np.array([row_of[name] for name in pairs["id_a"]], dtype=np.int64),
        np.array([row_of[name] for name in pairs["id_b"]], dtype=np.int64),
    )
    names = manifest["id"].tolist()
    found = pairs_within_groups(names, dict(zip(names, groups)))
    expected = pairs_within_groups(names, truth)
    recall = len(found & expected) / len(expected)
    precision = len(found & expected) / max(len(found), 1)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)
    # which copies are found: every kind joins its scene's group
    for kind in COPY_KINDS:
        for index in range(12):
            assert frozenset({f"scene-{index:02d}.jpg", f"scene-{index:02d}-{kind}.jpg"}) in found
    assert not any(name.startswith("alike") for pair in found for name in pair)
    assert pairs["mirrored"].any()


def test_pairs_are_the_same_whatever_the_workers_and_blocks(near_copies, monkeypatch) -> None:
    manifest, _ = near_copies
    one, _ = duplicates.hash_pair_table(manifest, limit=8, workers=1)
    monkeypatch.setattr(near_search, "BLOCK_CELLS", 7 * len(manifest))  # 7 rows a block
    several, _ = duplicates.hash_pair_table(manifest, limit=8, workers=2)
    pd.testing.assert_frame_equal(one, several)


def test_a_search_of_the_new_images_gives_the_pairs_of_a_whole_search(
    near_copies, tmp_path
) -> None:
    manifest, _ = near_copies
    earlier = manifest.drop(index=[0, 5, 40]).reset_index(drop=True)  # three images come later
    earlier_pairs, searched = duplicates.hash_pair_table(earlier, limit=8, workers=2)
    assert searched == len(earlier)
    duplicates.write_last_search(earlier, earlier_pairs, limit=8, folder=tmp_path)

    now = manifest.drop(index=[9]).copy()  # one image removed, one changed: hashed as another
    now.loc[12, ["phash", "phash_mirror"]] = now.loc[1, ["phash", "phash_mirror"]].to_numpy()
    last = duplicates.read_last_search(limit=8, folder=tmp_path)
    assert last is not None
    pairs, searched = duplicates.hash_pair_table(now, limit=8, workers=2, last=last)
    assert searched == 4
    whole, _ = duplicates.hash_pair_table(now, limit=8, workers=1)
    pd.testing.assert_frame_equal(pairs, whole)
    assert {now.loc[12, "id"], now.loc[1, "id"]} in [{a, b} for a, b in zip(pairs.id_a, pairs.id_b)]
    # another limit, or a search killed between its two files, is not used
    assert duplicates.read_last_search(limit=6, folder=tmp_path) is None
    duplicates.write_last_search(now, pairs, limit=8, folder=tmp_path / "other")
    (tmp_path / "other" / duplicates.FOUND_FILE).replace(tmp_path / duplicates.FOUND_FILE)
    assert duplicates.read_last_search(limit=8, folder=tmp_path) is None


def test_a_pair_is_the_same_in_either_order(near_copies) -> None:
    manifest, _ = near_copies
    forward, _ = duplicates.hash_pair_table(manifest, limit=8, workers=1)
    backward, _ = duplicates.hash_pair_table(manifest.iloc[::-1], limit=8, workers=1)
    as_set = {
        (frozenset({a, b}), d, m)
        for a, b, d, m in zip(forward.id_a, forward.id_b, forward.distance, forward.mirrored)
    }
    assert as_set == {
        (frozenset({a, b}), d, m)
        for a, b, d, m in zip(backward.id_a, backward.id_b, backward.distance, backward.mirrored)
    }


def test_blank_frames_pair_with_nothing() -> None:
    black = Image.new("RGB", (64, 36))
    manifest = measured_manifest(
        {"black-1.png": image_bytes_png(black), "black-2.png": image_bytes_png(black)}
    )
    assert manifest["blank"].all()
    assert duplicates.hash_pair_table(manifest, limit=10, workers=1)[0].empty


def image_bytes_png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_flag_catches_its_planted_image_and_spares_clean_ones(project_params) -> None:
    planted = planted_quality_files()
    manifest = measured_manifest({name: data for name, (data, _) in planted.items()})
    params = health.HealthParams.from_params(project_params)
    flags = health.quality_flags(manifest, params).set_index(manifest["id"])
    for name, (_, flag) in planted.items():
        raised = [column for column in health.FLAG_SCORES if flags.loc[name, column]]
        if flag is None:
            assert raised == [], (name, raised)
            assert not flags.loc[name, "flagged"]
        else:
            assert flag in raised, (name, raised, manifest.set_index("id").loc[name].to_dict())
            assert flags.loc[name, "flagged"]


def test_the_representative_is_the_largest_image_and_groups_are_numbered_by_size() -> None:
    manifest = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d", "e", "f"],
            "width": [100, 200, 100, 50, 100, 100],
            "height": [100, 200, 100, 50, 100, 100],
            "bytes": [10, 10, 10, 10, 30, 20],
        }
    )
    # a-b and c-d-e-f: the larger group first; b is the largest; e beats c and f on bytes
    groups = health.near_groups(manifest, np.array([0, 2, 3, 4]), np.array([1, 3, 4, 5]))
    assert groups["near_group"].tolist() == [2, 2, 1, 1, 1, 1]
    near_of = [value if isinstance(value, str) else None for value in groups["near_of"]]
    assert near_of == ["b", None, "e", "e", None, "e"]
    assert groups["near_size"].tolist() == [2, 2, 4, 4, 4, 4]
    alone = health.near_groups(manifest, np.empty(0, np.int64), np.empty(0, np.int64))
    assert (alone["near_group"] == 0).all() and alone["near_of"].isna().all()


def test_groups_across_subsets_are_counted() -> None:
    groups = pd.DataFrame({"near_group": [1, 1, 2, 2, 0, 0]})
    subsets = pd.Series(["train", "test", "valid", "valid", "train", "test"])
    assert health.straddling_groups(groups, subsets) == 1


def test_latent_pairs_keep_neighbours_within_the_limit_once() -> None:
    indices = np.array([[1, 2], [0, 2], [0, 1], [2, 0]])
    distances = np.array([[0.1, 0.9], [0.1, 0.5], [0.9, 0.5], [0.2, 3.0]], dtype=np.float32)
    usable = np.array([True, True, True, False])
    first, second = health.latent_pairs(indices, distances, 0.5, usable)
    assert list(zip(first, second)) == [(0, 1), (1, 2)]


def test_exact_neighbours_match_scikit_learn_and_copies_are_at_zero() -> None:
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(600, 12)).astype(np.float32)
    vectors[11] = vectors[10]
    indices, distances = near_search.nearest_neighbours(vectors, 5, 10**6, 0, 2)
    _, expected = NearestNeighbors(n_neighbors=6).fit(vectors).kneighbors(vectors)
    assert distances[10, 0] == 0 and indices[10, 0] == 11 and indices[11, 0] == 10
    for row, (found, known) in enumerate(zip(indices, expected)):
        assert set(found) == set(known[known != row][:5]), row
    assert (np.diff(distances, axis=1) >= 0).all()


def test_approximate_neighbours_are_seeded_and_mostly_right() -> None:
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(20, 8)) * 5
    vectors = (centers[rng.integers(0, 20, 1500)] + rng.normal(size=(1500, 8))).astype(np.float32)
    exact, _ = near_search.nearest_neighbours(vectors, 5, 10**6, 0, 1)
    first = near_search.nearest_neighbours(vectors, 5, 100, 42, 1)
    second = near_search.nearest_neighbours(vectors, 5, 100, 42, 1)
    np.testing.assert_array_equal(first[0], second[0])
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact, first[0])])
    assert recall >= 0.9, recall
    assert (first[0] != np.arange(1500)[:, None]).all()  # never its own neighbour


def test_kept_lists_with_the_new_images_merged_in_equal_a_whole_exact_search(tmp_path) -> None:
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(900, 12)).astype(np.float32)
    vectors[11] = vectors[10]
    ids = [f"image-{row:04d}" for row in range(len(vectors))]
    search = neighbour_lists.SearchSettings(k=5, exact_below=10**6, seed=0)
    cache = tmp_path / "neighbours.parquet"
    first_day = np.ones(len(vectors), dtype=bool)
    first_day[[3, 400, 899]] = False  # these come later
    _, _, searched = neighbour_lists.neighbour_lists(
        [i for i, keep in zip(ids, first_day) if keep], vectors[first_day], search, 2, cache
    )
    assert searched == first_day.sum()

    today = vectors.copy()
    today[7] += 0.5  # re-encoded differently: searched again
    present = np.ones(len(vectors), dtype=bool)
    present[20] = False  # gone: the lists that named it are searched again
    named_20 = sum(20 in row for row in near_search.exact_neighbours(vectors[first_day], 5, 1)[0])
    indices, distances, searched = neighbour_lists.neighbour_lists(
        [i for i, keep in zip(ids, present) if keep], today[present], search, 2, cache
    )
    assert 4 <= searched <= 4 + named_20 + 5 * 4  # the new, the changed, lists naming them
    whole_indices, whole_distances, _ = near_search.exact_neighbours(today[present], 5, 1)
    np.testing.assert_array_equal(indices, whole_indices)
    np.testing.assert_array_equal(distances, whole_distances)
    # other settings: the kept lists are not used
    other = neighbour_lists.SearchSettings(k=4, exact_below=10**6, seed=0)
    assert neighbour_lists.read_cached_lists(cache, other) is None


def test_new_images_join_approximate_lists_exactly(tmp_path) -> None:
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(20, 8)) * 5
    vectors = (centers[rng.integers(0, 20, 1500)] + rng.normal(size=(1500, 8))).astype(np.float32)
    ids = [f"image-{row:04d}" for row in range(len(vectors))]
    search = neighbour_lists.SearchSettings(k=5, exact_below=100, seed=42)
    cache = tmp_path / "neighbours.parquet"
    neighbour_lists.neighbour_lists(ids[:1480], vectors[:1480], search, 1, cache)
    indices, distances, searched = neighbour_lists.neighbour_lists(ids, vectors, search, 1, cache)
    assert searched == 20
    exact_indices, _, _ = near_search.exact_neighbours(vectors, 5, 1)
    np.testing.assert_array_equal(indices[1480:], exact_indices[1480:])
    # every earlier list holds each new image that is nearer than its k-th neighbour
    for row in range(1480):
        nearer = {other for other in exact_indices[row] if other >= 1480}
        assert nearer <= set(indices[row]), row
    assert (np.diff(distances, axis=1) >= 0).all()
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact_indices, indices)])
    assert recall >= 0.9, recall


def test_the_compiled_hash_search_finds_what_a_plain_loop_finds() -> None:
    rng = np.random.default_rng(4)
    hashes = rng.integers(0, 2**63, 300, dtype=np.int64).view(np.uint64) * np.uint64(2)
    mirrors = rng.integers(0, 2**63, 300, dtype=np.int64).view(np.uint64)
    for row in range(0, 300, 3):  # near copies, some of them as mirror images
        flips = np.uint64(sum(1 << int(bit) for bit in rng.choice(64, row % 9, replace=False)))
        hashes[row + 1] = (mirrors[row] if row % 2 else hashes[row]) ^ flips
    usable = rng.random(300) > 0.05
    searched = rng.random(300) < 0.3

    def plain_loop(searched_mask: np.ndarray) -> set[tuple[int, int, int, bool]]:
        found = set()
        for a in range(300):
            for b in range(a + 1, 300):
                if not (usable[a] and usable[b]) or not (searched_mask[a] or searched_mask[b]):
                    continue
                plain = (int(hashes[a]) ^ int(hashes[b])).bit_count()
                flipped = min(
                    (int(mirrors[a]) ^ int(hashes[b])).bit_count(),
                    (int(hashes[a]) ^ int(mirrors[b])).bit_count(),
                )
                if min(plain, flipped) <= 6:
                    found.add((a, b, min(plain, flipped), flipped < plain))
        return found

    for mask in (np.ones(300, dtype=bool), searched):
        first, second, distance, mirrored = near_search.hash_pairs(
            hashes, mirrors, usable, 6, workers=2, searched=mask
        )
        assert set(zip(first.tolist(), second.tolist(), distance.tolist(), mirrored.tolist())) == (
            plain_loop(mask)
        )
        assert (np.diff(first) >= 0).all()
    assert len(plain_loop(np.ones(300, dtype=bool))) >= 60
