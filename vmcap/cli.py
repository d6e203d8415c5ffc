"""vmcap's process rules for every command: exit codes, and the one place errors become them.

Exit codes (also in README.md and man/vmcap.1):
  0 success; 1 internal error; 2 usage error; 3 bad source; 4 source read error;
  5 output error; 6 corrupt vmcap output; 7 verify found a difference;
  8 unsupported request; 130 interrupted.

No click here: the makedumpfile front end (what kdump scripts run in a
capture kernel) goes through this module alone, and click costs it 1.5 MiB
and 11 ms of start-up. vmcap's own commands are in commands.py.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from .errors import BadSource, CorruptOutput, OutputError, SourceIOError, Unsupported, VerifyMismatch, VmcapError
from .process import (  # noqa: F401
    EXIT_BAD_SOURCE,
    EXIT_CORRUPT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_SOURCE_IO,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    Interrupted,
    StdoutWriteError,
    report_stdout_failure,
    silence_stdout,
)

EXIT_CODES = {
    BadSource: EXIT_BAD_SOURCE,
    SourceIOError: EXIT_SOURCE_IO,
    OutputError: EXIT_OUTPUT,
    CorruptOutput: EXIT_CORRUPT,
    VerifyMismatch: EXIT_MISMATCH,
    Unsupported: EXIT_UNSUPPORTED,
}


def exit_code(error: Exception) -> int:
    """By class, so a subclass (OutputFull) keeps its family's code."""
    return next((code for cls, code in EXIT_CODES.items() if isinstance(error, cls)),
                EXIT_INTERNAL)


def say_error(message: str) -> None:
    """One line on stderr."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


@contextmanager
def errors_to_exit_codes():
    """The one place where exceptions become a message line and an exit code."""
    try:
        yield
    except VmcapError as error:
        say_error(f"vmcap: error: {one_line(str(error))}")
        sys.exit(exit_code(error))
    except (KeyboardInterrupt, Interrupted) as stop:
        what = stop.args[0] if isinstance(stop, Interrupted) else "SIGINT"
        say_error(f"vmcap: interrupted by {what}")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader of our stdout went away after taking what it wanted
        # (`vmcap inspect | head -1`): the command did its job. A dump
        # written to stdout never gets here: its write errors are
        # OutputErrors (exit 5).
        silence_stdout()
        sys.exit(EXIT_OK)
    except StdoutWriteError as error:
        report_stdout_failure(error)
        sys.exit(EXIT_OUTPUT)
    except MemoryError:
        say_error("vmcap: error: out of memory")
        sys.exit(EXIT_INTERNAL)
    except Exception as error:  # a bug: one line, traceback only on request
        if type(error).__module__.split(".")[0] == "click":
            raise  # click's own flow (its Exit): commands.run_command's to handle
        if os.environ.get("VMCAP_DEBUG"):
            raise
        say_error(f"vmcap: internal error: {type(error).__name__}: "
                  f"{one_line(str(error))} (set VMCAP_DEBUG=1 for a traceback)")
        sys.exit(EXIT_INTERNAL)


def one_line(text: str, limit: int = 400) -> str:
    """Messages are one line, and never echo a value of thousands of characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def run_makedumpfile(args: list[str]) -> int:
    """`vmcap makedumpfile ARGS` / `vmcap-makedumpfile ARGS`: makedumpfile's command line."""
    from . import makedumpfile_cli as mdf

    arguments = list(args)
    if arguments[:1] == ["--"]:
        arguments = arguments[1:]
    try:
        request = mdf.parse(arguments)
    except mdf.UsageProblem as problem:
        say_error(f"vmcap: error: {one_line(str(problem))} (see '{mdf.PROG} -h')")
        return EXIT_USAGE
    except mdf.UnsupportedOption as refused:
        say_error(f"vmcap: error: {one_line(str(refused))}")
        return EXIT_UNSUPPORTED
    with errors_to_exit_codes():
        try:
            return mdf.execute(request, stderr_is_terminal=is_terminal(sys.stderr))
        except mdf.UnsupportedOption as refused:
            raise Unsupported(str(refused)) from None
        except VmcapError as error:
            if not request.message_level & mdf.MESSAGE_ERROR:
                # --message-level without the error bit: the exit code alone says it.
                return exit_code(error)
            raise


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
