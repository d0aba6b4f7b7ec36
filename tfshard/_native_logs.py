"""TensorFlow's C++ log lines: start TensorFlow so that its log level holds.

TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL`` once, when it starts (setting it
later changes nothing), and some lines ignore it anyway: the ones printed
while ``import tensorflow`` loads its libraries, before absl's logging is set
up ("WARNING: All log messages before absl::InitializeLog() ...", "I0000 ...
port.cc ... oneDNN custom operations are on"). :func:`import_tensorflow`
holds those back too when the level hides INFO lines.

The ``tfshard`` command is quiet by default: when this process is that
command (the console script, or ``python -m tfshard.app.cli``),
:func:`import_tensorflow` first sets ``TF_CPP_MIN_LOG_LEVEL=3`` unless the
user set it or asked for ``-v``/``--debug`` (or ``TFSHARD_DEBUG=1``). Level
3 also hides C++ ERROR lines: on a DTensor program those are Grappler's cost
estimator ("Incompatible Matrix dimensions", it sees per-device shapes) and
DTensor's cache notes, not failures; a real failure reaches Python as an
exception, which the command reports. Python warnings are not touched.

This module imports nothing heavy: ``tfshard/__init__.py`` calls it before
anything imports TensorFlow.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
QUIET_COMMAND_LEVEL = "3"
VERBOSE_FLAGS = ("-v", "--debug")
COMMAND_MODULE = "tfshard.app.cli"
COMMAND_NAME = "tfshard"

# absl/TensorFlow C++ log lines: "I0000 00:00:1796195924.401107   18834 file.cc:12] ..."
_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")
_BEFORE_INIT = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def is_native_log_line(line: str) -> bool:
    """A line TensorFlow's C++ logging wrote (not Python, not a user)."""
    return bool(_LOG_LINE.match(line)) or line.startswith(_BEFORE_INIT)


def _command_args(argv=None, orig_argv=None):
    """This process's command-line arguments if it is the ``tfshard``
    command, else None."""
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    if argv and os.path.basename(argv[0]) in (COMMAND_NAME, COMMAND_NAME + ".exe"):
        return list(argv[1:])
    for i, arg in enumerate(orig_argv[:-1]):
        if arg == "-m":
            return list(orig_argv[i + 2:]) if orig_argv[i + 1] == COMMAND_MODULE else None
    return None


def command_wants_verbose(args) -> bool:
    """``-v``/``--debug`` given to the command itself (not to a command that
    ``tfshard launch`` runs after ``--``), or ``TFSHARD_DEBUG`` set."""
    own = args[: args.index("--")] if "--" in args else args
    return any(a in VERBOSE_FLAGS for a in own) or os.environ.get("TFSHARD_DEBUG", "") not in ("", "0")


def quiet_command_level(argv=None, orig_argv=None):
    """Set ``TF_CPP_MIN_LOG_LEVEL`` for the ``tfshard`` command (see the
    module docstring); returns the level set, or None."""
    args = _command_args(argv, orig_argv)
    if args is None or LEVEL_VARIABLE in os.environ or command_wants_verbose(args):
        return None
    os.environ[LEVEL_VARIABLE] = QUIET_COMMAND_LEVEL
    return QUIET_COMMAND_LEVEL


def _hides_info() -> bool:
    try:
        return int(os.environ.get(LEVEL_VARIABLE, "0")) >= 1
    except ValueError:
        return False


def import_tensorflow():
    """``import tensorflow``, holding back the C++ lines it prints before its
    logging starts when ``TF_CPP_MIN_LOG_LEVEL`` hides INFO lines; every
    other line written to stderr meanwhile is passed on, in order."""
    quiet_command_level()
    if "tensorflow" in sys.modules or not _hides_info():
        import tensorflow  # noqa: F401

        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines(keepends=True) if not is_native_log_line(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
