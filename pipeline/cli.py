"""The `structlora` command line (DESIGN.md section 6 is the contract): parse, run the handler, report.

The parser is pipeline.cli_parser, the subcommands' handlers pipeline.cli_handlers; `main` here is the
entry point (`structlora = "pipeline.cli:main"`, `python -m pipeline.cli`), which turns user-facing errors
into one line on stderr.
"""

from __future__ import annotations

import importlib
import sys

from pipeline.cli_parser import build_parser
from pipeline.errors import UserError, permission_message


def _user_facing_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is meant for the user (they name the file and the field)."""
    classes: list[type[BaseException]] = [UserError]
    for module_name, class_name in (("data.errors", "DataError"), ("eval.errors", "EvalInputError"),
                                    ("eval.errors", "JavaNotFoundError"), ("app.errors", "DemoError")):
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def _close_process_group() -> None:
    """Under torchrun / accelerate launch: tear the process group down before the interpreter exits (a gloo
    group left running can abort a finished rank at exit, 'terminate called without an active exception')."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
        _close_process_group()
        return code
    except Exception as err:  # noqa: BLE001 - user-facing errors become one line; anything else re-raises
        if isinstance(err, _user_facing_errors()):
            print(f"error: {err}", file=sys.stderr)
            return 2
        message = permission_message(err)
        if message:
            print(f"error: {message}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
