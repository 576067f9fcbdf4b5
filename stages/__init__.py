"""The pipeline's stages, one module each, run by DVC as `python -m stages.<name>`."""
