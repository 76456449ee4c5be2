"""The `surgery` command line.

Exit codes: 0 ok, 1 user error (recipe, model, input files or output folder; a message says
what to change), 2 usage error, 3 verification or the recipe's perplexity check failed (the
output is kept and its report says why), 4 internal error (a bug: one line names the exception
and where, and a report file has the full traceback). `main(argv)` runs a command in-process
and returns its exit code; it never raises and never prints a traceback.
"""

from __future__ import annotations

import os
import sys

from surgery.cli.arguments import argument_parser
from surgery.cli.codes import (
    ENVIRONMENT_ERRORS,
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_USER_ERROR,
)
from surgery.memory import return_freed_memory_to_the_system


def main(argv: list[str] | None = None) -> int:
    """Run one `surgery` command in-process; returns its exit code (never raises).

    0 ok, 1 user error (a message), 2 usage error, 3 verification failed, 4 internal error
    (one line naming the exception and where, and the path of a report with the traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    return_freed_memory_to_the_system()
    try:
        args = argument_parser().parse_args(argv)
    except SystemExit as exit_:  # --help and --version (0), usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    from surgery.console import quiet_console

    with quiet_console(args.verbose or args.verbose_global):
        return _run(args, argv)


def _run(args, argv: list[str]) -> int:
    from surgery.backend.output import OutputError
    from surgery.cli.compile_commands import run_apply, run_check, run_plan
    from surgery.cli.model_commands import run_accept, run_eval, run_importance, run_models, run_run
    from surgery.console import print_error, report_internal_error
    from surgery.diagnostics import HintedError, RecipeError

    handlers = {
        "check": run_check,
        "plan": run_plan,
        "apply": run_apply,
        "importance": run_importance,
        "eval": run_eval,
        "run": run_run,
        "accept": run_accept,
        "models": run_models,
    }
    try:
        return handlers[args.command](args)
    except RecipeError as error:
        print_error(str(error))
        return EXIT_USER_ERROR
    except OutputError as error:
        print_error(f"error: {error}")
        return EXIT_USER_ERROR
    except HintedError as error:  # a model spec, a text, a file, a built-in model that cannot be fetched
        print_error(f"error: {error}" + (f"\n  = hint: {error.hint}" if error.hint else ""))
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # The reader of stdout went away (`surgery plan R | head`): nothing more to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except MemoryError:
        print_error("error: out of memory\n  = hint: close other programs, or use a smaller model or fewer samples")
        return EXIT_USER_ERROR
    except OSError as error:
        # A full disk, a read-only folder, missing permissions: the machine's state, not a bug.
        if error.filename is None and error.errno not in ENVIRONMENT_ERRORS:
            print_error(report_internal_error(error, argv))
            return EXIT_INTERNAL_ERROR
        where = f": {error.filename}" if error.filename else ""
        print_error(f"error: {(error.strerror or type(error).__name__).lower()}{where}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print_error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as error:
        print_error(report_internal_error(error, argv))
        return EXIT_INTERNAL_ERROR


def entry() -> None:
    """The console script: `main`, then exit without interpreter teardown.

    Tearing down torch and onnxruntime at exit takes most of a second for a small model; by
    the time `main` returns every file surgery wrote is closed and renamed into place, so
    only the standard streams need flushing.
    """
    from surgery.bytecode import cache_bytecode_if_read_only

    cache_bytecode_if_read_only()  # before torch is imported
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
