"""Write the README's params table from the stages' params models: `make params-doc`.

The models (typed fields with bounds or choices, defaults and meanings) are the one place
a param is described; this puts them in the README between two marker lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages import (
    cluster,
    compute,
    describe,
    duplicates,
    embed,
    explore,
    health,
    pattern_model,
    posters,
    prepare,
    score,
    settings,
    split,
    sync_work,
    train,
    words,
)

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- params table: written by `make params-doc` from the models in stages/ -->"
END = "<!-- end of params table -->"

# What each stage of dvc.yaml reads, in pipeline order.
STAGE_MODELS: dict[str, list[type[settings.Section]]] = {
    "sync": [sync_work.SyncParams],
    "prepare": [prepare.ImageParams, prepare.PrepareParams],
    "duplicates": [duplicates.DuplicatesParams],
    "split": [split.SplitParams],
    "train": [train.TrainParams],
    "vocabulary": [words.WordsParams],
    "words": [words.WordsParams],
    "describe": [describe.DescribeParams, embed.EmbedParams],
    "embed": [embed.EmbedParams],
    "health": [health.HealthParams],
    "cluster": [cluster.ClusterParams],
    "assign": [],  # none: the model and the embeddings decide everything
    "score": [score.ScoreParams],
    "mine": [pattern_model.PatternsParams],
    "patterns": [pattern_model.PatternsParams],
    "explore": [explore.ExploreParams],
    "posters": [posters.PostersParams],
}


# Read by several stages and listed by none in dvc.yaml: where the work runs, not what it gives.
SHARED_MODELS: list[type[settings.Section]] = [compute.ComputeParams]


def all_models() -> list[type[settings.Section]]:
    """Every params model, in pipeline order, then the shared ones; each once (the words
    section serves vocabulary and words, the patterns section mine and patterns)."""
    stages = [model for models in STAGE_MODELS.values() for model in models]
    return list(dict.fromkeys(stages + SHARED_MODELS))


def readme_with_table(readme: str) -> str:
    """The README text with the table between the markers replaced by the current one."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + settings.params_table(all_models()) + readme[end:]


def main() -> None:
    """Rewrite the table in README.md; say whether it changed."""
    text = README.read_text(encoding="utf-8")
    updated = readme_with_table(text)
    README.write_text(updated, encoding="utf-8")
    print("README.md params table " + ("updated" if updated != text else "already current"))


if __name__ == "__main__":
    sys.exit(main())
