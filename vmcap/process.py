"""What every vmcap process does with its stop signals and its standard output.

Standard library only, on purpose: the handlers are installed before click,
numpy or zstandard load, so a signal that arrives while they are still being
imported ends vmcap the same way as one that arrives mid-copy (one line on
stderr, exit code 130), never a KeyboardInterrupt traceback or click's
"Aborted!" with exit code 1.

The exit code numbers are here for the same reason (entry.py needs them
before anything else loads); cli.py is the one place errors become them.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

# Also in README.md and man/vmcap.1.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_SOURCE = 3
EXIT_SOURCE_IO = 4
EXIT_OUTPUT = 5
EXIT_CORRUPT = 6
EXIT_MISMATCH = 7
EXIT_UNSUPPORTED = 8
EXIT_INTERRUPTED = 130

# SIGHUP: the terminal or the ssh session of a capture went away; it ends the
# run like SIGTERM does (partial output removed), not by killing the process
# with a stray temporary file left behind.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal arrived; raised in the main thread at the next bytecode.

    Not a KeyboardInterrupt: click turns those into "Aborted!" and exit 1.
    Every cleanup path catches BaseException, so partial output is removed.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_stop_signal(signum, frame):
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Stop signals raise Interrupted; a signal the parent ignores stays ignored.

    (`nohup vmcap save ...` ignores SIGHUP on purpose, and a shell's
    background jobs ignore SIGINT.)
    """
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _on_stop_signal)


class StdoutWriteError(OSError):
    """Writing our own standard output failed (ENOSPC on /dev/full, EIO)."""


class GuardedStdout:
    """sys.stdout whose write errors say they are stdout's.

    A closed pipe stays a BrokenPipeError (the reader is satisfied: success
    for a read-only command); any other write error becomes a
    ``StdoutWriteError`` so it is reported as an output error (exit 5), not as
    an internal error.
    """

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, method, *args):
        try:
            return method(*args)
        except BrokenPipeError:
            raise
        except OSError as error:
            raise StdoutWriteError(error.errno, error.strerror) from None

    def write(self, text):
        return self._guard(self._stream.write, text)

    def flush(self):
        return self._guard(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def silence_stdout() -> None:
    """After a closed pipe: send what is left to /dev/null so the exit flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def say(message: str) -> None:
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def report_stdout_failure(error: StdoutWriteError) -> None:
    """Our stdout cannot be written (ENOSPC on /dev/full, EIO): one line (the caller exits 5)."""
    silence_stdout()
    say(f"vmcap: error: standard output: write failed: "
         f"{error.strerror or errno.errorcode.get(error.errno, error.errno)}")
