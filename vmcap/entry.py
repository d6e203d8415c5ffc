"""The process entry point: signals first, then the command line, then a clean exit.

This module imports nothing heavy on purpose. A signal that arrives while
click, numpy or zstandard are still being imported must end vmcap the same
way as one that arrives mid-copy: one line on stderr and exit code 130, never
a KeyboardInterrupt traceback or click's "Aborted!" with exit code 1.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_OUTPUT = 5
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


class _GuardedStdout:
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


def _say(message: str) -> None:
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def report_stdout_failure(error: StdoutWriteError) -> int:
    """Our stdout cannot be written (ENOSPC on /dev/full, EIO): one line, exit code 5."""
    silence_stdout()
    _say(f"vmcap: error: standard output: write failed: "
         f"{error.strerror or errno.errorcode.get(error.errno, error.errno)}")
    return EXIT_OUTPUT


def _flush_stdout(code: int) -> int:
    """The exit code once what is left on stdout is written out."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    except StdoutWriteError as error:
        return code or report_stdout_failure(error)
    return code


def run(argv: list[str] | None = None) -> None:
    """`vmcap ...`: every outcome is an exit code from the documented table."""
    install_signal_handlers()
    code = EXIT_INTERNAL
    try:
        if sys.stdout is not None:
            sys.stdout = _GuardedStdout(sys.stdout)
        arguments = sys.argv[1:] if argv is None else list(argv)
        try:
            if arguments[:1] == ["makedumpfile"]:
                # what kdump scripts run in the capture kernel: no click (1.5 MiB, 11 ms)
                from .cli import run_makedumpfile

                code = run_makedumpfile(arguments[1:])
            else:
                from .commands import run_command

                code = run_command(arguments)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        code = _flush_stdout(code)
    except Interrupted as stop:
        _say(f"vmcap: interrupted by {stop.args[0]}")
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say("vmcap: interrupted by SIGINT")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        silence_stdout()
        code = 0
    except StdoutWriteError as error:
        code = report_stdout_failure(error)
    # Signals that arrive while the interpreter shuts down must not print
    # a traceback either.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run()
