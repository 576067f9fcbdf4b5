"""TensorFlow's start-up lines obey TF_CPP_MIN_LOG_LEVEL, and nothing else is held back."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT, project_environment

from stages import quiet_start

ABSL_INFO = b"I0000 00:00:1796061381.074765    2773 port.cc:153] oneDNN custom operations are on.\n"
ABSL_WARNING = b"W1130 18:01:02.123456    2773 some_file.cc:12] a warning\n"
ABSL_ERROR = b"E0000 00:00:1796061381.074765    2773 loader.cc:9] an error\n"
ABSL_FATAL = b"F0000 00:00:1796061381.074765    2773 guard.cc:1] the CPU lacks AVX\n"
ABSL_NOTICE = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
)
PLAIN = b"a line of someone else's, such as a Python warning\n"


def run_filtered(level: str, body: str) -> subprocess.CompletedProcess[bytes]:
    """Run `body` inside native_logs_filtered() in a new process at a TF_CPP_MIN_LOG_LEVEL."""
    lines = "\n".join(f"    {line}" for line in body.splitlines())
    script = (
        "import os\nfrom stages.quiet_start import native_logs_filtered\n"
        f"with native_logs_filtered():\n{lines}\n"
    )
    environment = {**project_environment(), "PYTHONPATH": str(REPO_ROOT)}
    environment["TF_CPP_MIN_LOG_LEVEL"] = level
    return subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, timeout=120
    )


def writes(*lines: bytes) -> str:
    """Code that writes lines straight to file descriptor 2, as native code does."""
    return "\n".join(f"os.write(2, {line!r})" for line in lines)


def test_info_and_warning_lines_are_dropped_at_level_3_and_errors_pass() -> None:
    everything = (ABSL_NOTICE, ABSL_INFO, PLAIN, ABSL_WARNING, ABSL_ERROR, ABSL_FATAL)
    result = run_filtered("3", writes(*everything))
    assert result.returncode == 0, result.stderr
    assert result.stderr == PLAIN + ABSL_ERROR + ABSL_FATAL


def test_level_1_keeps_warnings_and_level_0_keeps_everything() -> None:
    assert run_filtered("1", writes(ABSL_INFO, ABSL_WARNING)).stderr == ABSL_WARNING
    # At level 0 TensorFlow's own start-up lines come first (the module loads Keras).
    kept = run_filtered("0", writes(ABSL_INFO, ABSL_WARNING)).stderr
    assert kept.endswith(ABSL_INFO + ABSL_WARNING) and b"port.cc" in kept


def test_a_line_written_just_before_a_crash_still_shows() -> None:
    result = run_filtered("3", writes(ABSL_INFO, ABSL_FATAL) + "\nos.abort()")
    assert result.returncode != 0
    assert result.stderr == ABSL_FATAL


def test_stderr_is_the_process_own_again_after_the_block() -> None:
    environment = {**project_environment(), "PYTHONPATH": str(REPO_ROOT)}
    environment["TF_CPP_MIN_LOG_LEVEL"] = "3"
    after = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os\nfrom stages.quiet_start import native_logs_filtered\n"
            "with native_logs_filtered():\n    pass\n"
            f"os.write(2, {ABSL_INFO!r})",
        ],
        env=environment,
        capture_output=True,
        timeout=120,
    )
    assert after.stderr == ABSL_INFO, "outside the block nothing is filtered"


def test_loading_keras_prints_nothing_at_level_3() -> None:
    environment = {**project_environment(), "PYTHONPATH": str(REPO_ROOT)}
    environment["TF_CPP_MIN_LOG_LEVEL"] = "3"
    code = "from stages.quiet_start import keras\nprint(keras.backend.backend())"
    result = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "tensorflow"
    assert result.stderr == b"", result.stderr.decode()


def test_the_severities_dropped_follow_the_level() -> None:
    assert quiet_start.dropped_severities("3") == "IW"
    assert quiet_start.dropped_severities("2") == "IW"
    assert quiet_start.dropped_severities("1") == "I"
    assert quiet_start.dropped_severities("0") == ""
    assert quiet_start.dropped_severities(None) == ""
    assert quiet_start.dropped_severities("loud") == ""


def test_keras_loads_without_scikit_learn_which_still_imports_after() -> None:
    environment = {**project_environment(), "PYTHONPATH": str(REPO_ROOT)}
    code = (
        "import sys\nfrom stages.quiet_start import keras\n"
        "print('sklearn' in sys.modules)\n"
        "from sklearn.decomposition import PCA\nprint(PCA(n_components=1).n_components)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split() == ["False", "1"]
