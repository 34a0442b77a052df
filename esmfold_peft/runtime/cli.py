"""How every script starts and ends: argument types, `--set` overrides, and one exit path.

    def main(argv=None) -> int:
        return run_main(_main, argv)      # _main parses argv and does the work
    if __name__ == "__main__":
        sys.exit(main())

`run_main` turns a `UserError` into its one line and exit code 2, Ctrl-C into exit 130, an
unwritable output into one line, a reader that stopped reading (`| head`) into a quiet exit 1, and
anything else into a one-line internal error (the traceback is printed only with
ESMFOLD_PEFT_DEBUG=1): a user never sees a traceback.
"""

from __future__ import annotations

import argparse
import numbers
import os
import sys
from typing import Callable

from .errors import EXIT_CODES, EXIT_INTERRUPTED, EXIT_SOME_FAILED, EXIT_USAGE, UserError, describe_os_error

DEBUG_ENV = "ESMFOLD_PEFT_DEBUG"
DOCS_HINT = "the method and the tools are described in docs/method.md"


def int_at_least(minimum: int):
    """An argparse `type` accepting integers >= minimum, with a clear message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def add_set_argument(parser: argparse.ArgumentParser, example: str = "model.trunk.chunk_size=64") -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example} (repeatable)")


def add_allow_other_base_argument(parser, what: str = "the run's adapters", note: str = "") -> None:
    """`--allow-other-base`, one flag for every script that loads adapters (adapters/provenance.py)."""
    parser.add_argument("--allow-other-base", action="store_true",
                        help=f"load {what} even onto frozen weights other than those they were made for (same "
                             f"architecture; refused by default, naming both){note}")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The training scripts' flags for what the run loop does besides training: loggers, the kept model, bars."""
    from .loggers import LOGGERS

    parser.add_argument("--log", action="append", choices=LOGGERS, metavar="LOGGER",
                        help=f"also log to {', '.join(LOGGERS)} (repeatable; train.loggers): TensorBoard events in "
                             "RUN/tensorboard, W&B offline in RUN/wandb, RUN/metrics.csv; metrics.jsonl is always "
                             "written")
    parser.add_argument("--keep", choices=("best", "last"),
                        help="the model a finished run exports (train.keep): best (its best validation score, "
                             "default) or last")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar: a log line every train.log_every steps instead (also when stderr "
                             "is not a terminal)")


def loggers_flag(args) -> "str | None":
    """`train.loggers` for the --log flags given (None: not given)."""
    return ",".join(dict.fromkeys(args.log)) if args.log else None


def overrides_from(flags: dict, extra=()) -> list[str]:
    """`key=value` overrides for the flags that were given (None = not given), then the `--set` ones."""
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + list(extra)


def exit_code_table() -> str:
    return "Exit status: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items()) + "."


def config_names(nlp: bool = False) -> list[str]:
    """The named configs in the project's configs/: the folding ones, or (nlp=True) the NLP harness's (nlp_*)."""
    from .rundir import project_root

    return sorted(p.stem for p in (project_root() / "configs").glob("*.py")
                  if not p.stem.startswith("_") and p.stem.startswith("nlp_") == nlp)


def _plain(value):
    """A config value as plain YAML data: mappings as dicts, tuples and lists as lists, paths as text."""
    if hasattr(value, "items") and hasattr(value, "keys"):  # dict, ConfigDict (references resolved)
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def config_yaml(cfg) -> str:
    """A config as plain YAML (keys sorted) that `yaml.safe_load` reads back: what --print-config prints."""
    import yaml

    return yaml.safe_dump(_plain(cfg), sort_keys=True, default_flow_style=False, allow_unicode=True)


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at devnull, so that flushing it at exit raises nothing (Python's
    documented way, see the `signal` module's note on SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing to flush
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def run_main(main: Callable[..., int], *args) -> int:
    """Call `main(*args)` and map every way it can end onto the exit-code table (see the module docstring)."""
    try:
        status = int(main(*args) or 0)
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, inside the handler
        return status
    except UserError as exc:
        error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout closed it: nothing more to say, and no traceback
        _silence_stdout()
        return EXIT_SOME_FAILED
    except MemoryError:
        error("out of memory")
        return EXIT_SOME_FAILED
    except OSError as exc:  # an output or input the system refused (disk full, permissions, name too long)
        if os.environ.get(DEBUG_ENV):
            raise
        error(describe_os_error(exc))
        return EXIT_USAGE
    except Exception as exc:  # a bug: one line, the traceback on demand
        if os.environ.get(DEBUG_ENV):
            raise
        error(f"internal error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 to see where)")
        return EXIT_SOME_FAILED
