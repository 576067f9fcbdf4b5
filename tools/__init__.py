"""Project tools that are not stages (run with `python -m tools.<name>`)."""
