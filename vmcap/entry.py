"""The process entry points: signals first, then the command line, then a clean exit.

``vmcap ...`` and ``vmcap-makedumpfile ...`` start here. Nothing heavy is
imported before the signal handlers are in place (process.py); the commands
load after them: `vmcap makedumpfile` through cli.py alone (what kdump
scripts run in a capture kernel: no click), everything else through
commands.py.
"""

from __future__ import annotations

import os
import signal
import sys

# Nothing but the standard library before the handlers are installed: a signal that
# arrives while cli.py or click load must end vmcap with one line and 130 too.
from .process import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    STOP_SIGNALS,
    GuardedStdout,
    Interrupted,
    StdoutWriteError,
    install_signal_handlers,
    report_stdout_failure,
    say,
    silence_stdout,
)


def _flush_stdout(code: int) -> int:
    """The exit code once what is left on stdout is written out."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    except StdoutWriteError as error:
        if code:
            return code  # the command failed already and said why: its code stands
        report_stdout_failure(error)
        return EXIT_OUTPUT
    return code


def quiet_blas_threads(environ=os.environ) -> None:
    """One OpenBLAS thread unless the user asked for more; before numpy is imported.

    vmcap uses no BLAS, but numpy's OpenBLAS starts a thread per CPU when it
    loads, and those threads spin: 0.09 s of CPU per run on 2 CPUs (more on
    bigger machines) and a buffer each. The bundle's wrapper sets the same.
    """
    environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def run(argv: list[str] | None = None) -> None:
    """`vmcap ...`: every outcome is an exit code from the documented table."""
    install_signal_handlers()
    quiet_blas_threads()
    code = EXIT_INTERNAL
    try:
        if sys.stdout is not None:
            sys.stdout = GuardedStdout(sys.stdout)
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
        say(f"vmcap: interrupted by {stop.args[0]}")
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        say("vmcap: interrupted by SIGINT")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        silence_stdout()
        code = EXIT_OK
    except StdoutWriteError as error:
        report_stdout_failure(error)
        code = EXIT_OUTPUT
    # Signals that arrive while the interpreter shuts down must not print
    # a traceback either.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)


def run_as_makedumpfile(argv: list[str] | None = None) -> None:
    """Console script `vmcap-makedumpfile`: makedumpfile's command line, `vmcap`'s process rules."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    run(["makedumpfile", "--", *arguments])


if __name__ == "__main__":
    run()
