"""``psa-vlm`` console command: a thin dispatcher over subcommand modules.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int`` (and
optionally ``check_arguments(args)`` for checks across arguments, run right after parsing); the module is
imported only when its subcommand runs, so ``psa-vlm --help`` stays fast.

Every argument error is one line on stderr and exit status 2, with no traceback: argparse errors (through
``OneLineArgumentParser`` and the ``type=`` callables below, which check values at parse time) and
``CLIError`` raised by a subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

# name -> (module, one-line help)
SUBCOMMANDS = {
    "run": ("psa_vlm.run", "answer a question about a video with a PSA-patched Qwen VL model (default: tiny demo)"),
    "demo": ("psa_vlm.demo", "PSA against dense attention on synthetic video-like tensors (no model)"),
    "bench-attention": ("psa_vlm.bench.attention", "attention-layer benchmark: PSA stages vs dense SDPA (GPU)"),
    "bench-prefill": ("psa_vlm.bench.prefill", "time to first token of a 7B/8B-shaped Qwen VL, PSA vs dense (GPU)"),
    "eval-sweep": ("psa_vlm.eval.sweep", "lmms-eval accuracy against sparsity across presets"),
    "eval-fidelity": ("psa_vlm.eval.fidelity", "KL, answer agreement and per-layer attention error against dense"),
    "calibrate": ("psa_vlm.eval.calibrate", "choose per-layer PSA settings under an error target; write a JSON config"),
    "build-tiny": ("psa_vlm.models.tiny", "build a tiny offline checkpoint of a Qwen VL family (--family)"),
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


class _ArgumentError(CLIError):
    """An argparse error of a subcommand (unknown option, bad value): one line, exit status 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage block) and raise instead of exiting.

    ``psa_vlm.cli.main`` prints ``psa-vlm COMMAND: error: MESSAGE (see psa-vlm COMMAND --help)`` and returns 2,
    argparse's own exit status for argument errors.
    """

    def error(self, message: str):  # type: ignore[override]
        raise _ArgumentError(message)


# ---------------------------------------------------------------------------------------------- argument types
# argparse ``type=`` callables: a bad value becomes a one-line argument error at parse time, naming the value.
def _int(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def positive_int_list(text: str) -> List[int]:
    """Comma-separated integers >= 1 (at least one), e.g. ``16384,32768``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    try:
        return [_int(p, 1, "a positive integer") for p in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}") from None


def preset_name(text: str) -> str:
    """A name in ``psa_vlm.PRESETS``."""
    from .config import PRESETS

    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown PSA preset {text!r}; choose one of {', '.join(PRESETS)}")
    return text


def _writable_ancestor(path: Path, target: str) -> None:
    """Raise ``ArgumentTypeError`` (naming ``target``) unless ``path`` could be created: its nearest existing
    ancestor is a directory in which this process can create entries (probed with a temporary directory,
    removed at once)."""
    anc = path
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise argparse.ArgumentTypeError(f"{target!r}: {str(anc)!r} is not a directory")
    try:
        tempfile.TemporaryDirectory(dir=anc, prefix=".psa_vlm_probe-").cleanup()
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot write {target!r}: creating entries under {str(anc)!r} fails ({exc.strerror or exc}); "
            "choose another path"
        ) from None


def output_dir(text: str) -> Path:
    """A directory path that exists or can be created (checked at parse time)."""
    p = Path(text).expanduser()
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    _writable_ancestor(p, text)
    return p


def output_file(text: str) -> str:
    """A file path whose folder exists or can be created, or ``''`` for none (checked at parse time)."""
    if text == "":
        return text
    p = Path(text).expanduser()
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path")
    _writable_ancestor(p.parent, text)
    return text


def existing_dir(text: str) -> str:
    """A directory that exists."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def choice_list(choices: Callable[[str], bool], what: str) -> Callable[[str], List[str]]:
    """A comma-separated list whose every item satisfies ``choices`` (e.g. known preset names)."""

    def parse(text: str) -> List[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"is empty; give comma-separated {what}")
        bad = [x for x in items if not choices(x)]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(bad)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psa-vlm", description="Pyramid Sparse Attention for Qwen VL models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # arguments are added lazily in main() once the subcommand is known
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    verbose = False
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] in ("-h", "--help"):
            parser.print_help()
            return 0
        if argv[i] in ("-v", "--verbose"):
            verbose = True
        else:
            # options before a subcommand belong to the default subcommand (`psa-vlm --preset paper`)
            break
        i += 1
    if i < len(argv) and not argv[i].startswith("-"):
        command, rest = argv[i], argv[i + 1 :]
    else:
        command, rest = "run", argv[i:]  # `psa-vlm` alone runs the main job on the embedded default
    if command not in SUBCOMMANDS:
        print(f"psa-vlm: error: unknown command {command!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    sub_parser = OneLineArgumentParser(prog=f"psa-vlm {command}", description=SUBCOMMANDS[command][1])
    sub_parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    module.add_arguments(sub_parser)
    try:
        args = sub_parser.parse_args(rest)
        check = getattr(module, "check_arguments", None)
        if check is not None:  # cross-argument checks, still before anything slow
            check(args)
    except CLIError as exc:
        print(f"psa-vlm {command}: error: {exc} (see psa-vlm {command} --help)", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if (verbose or args.verbose) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(module.main(args) or 0)
    except CLIError as exc:
        print(f"psa-vlm {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # `python -m psa_vlm.cli`: run the package's module, so that subcommands raise the same CLIError class
    from psa_vlm.cli import main as _main

    sys.exit(_main())
