"""sync: bring images from a source into the collection and describe every one of them.

Params:  SyncParams (stages/sync_work.py; params.yaml, section sync)
Inputs:  the source; the history file when set
Outputs: data/raw/collections/ (the images), data/raw/manifest.parquet, data/raw/rejected.csv,
         data/raw/remote.parquet (path, url, etag, size, reason of each remote object seen,
         so that the next run fetches only new or changed ones; empty for local sources)

`dvc repro` runs sync every time (the source is outside DVC's view). So this module first
checks, with the standard library only, whether a local source folder, the collection,
the params, the code and the outputs are as the last run left them (stages/sync_last_run):
then it logs one line and stops before Python loads pandas and the rest of sync, which
took as long again as the check (0.9 s at 100,000 files). Otherwise stages/sync_work does
the work, reusing the check's walks.
"""

from __future__ import annotations

import time

from stages import stage_usage, sync_last_run


def run() -> None:
    """Check for changes; do the work when there are any."""
    started = time.perf_counter()
    try:
        checked = sync_last_run.compare_with_last_run()
    except OSError:  # an unreadable folder: the work reports it, naming it
        checked = sync_last_run.Comparison(False)
    if checked.unchanged:
        sync_last_run.log_unchanged(checked, started)
        stage_usage.record_usage()
        return
    from stages import common, sync_work  # pandas and the rest load only for the work

    common.run_stage(lambda: sync_work.main(checked, started))


if __name__ == "__main__":
    run()
