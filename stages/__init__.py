"""The pipeline's stages, one module each, run by DVC as `python -m stages.<name>`."""

import os

# Set before TensorFlow loads (stages that use it import this package first).
# oneDNN kernels train this project's conv nets 2-3 times faster on CPUs where TensorFlow
# leaves them off by default (AMD), and stay deterministic run to run on one machine.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
