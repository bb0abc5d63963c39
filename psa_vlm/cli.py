"""``psa-vlm`` console command: a thin dispatcher over subcommand modules.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``; the
module is imported only when its subcommand runs, so ``psa-vlm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

# name -> (module, one-line help)
SUBCOMMANDS = {
    "run": ("psa_vlm.run", "answer a question about a video with a PSA-patched Qwen2.5-VL (default: tiny offline demo)"),
    "demo": ("psa_vlm.demo", "PSA against dense attention on synthetic video-like tensors (no model)"),
    "bench-attention": ("psa_vlm.bench.attention", "attention-layer benchmark: PSA stages vs dense SDPA (GPU)"),
    "bench-prefill": ("psa_vlm.bench.prefill", "time to first token of a 7B-shaped model, PSA vs dense (GPU)"),
    "eval-sweep": ("psa_vlm.eval.sweep", "lmms-eval accuracy against sparsity across presets"),
    "eval-fidelity": ("psa_vlm.eval.fidelity", "KL, answer agreement and per-layer attention error against dense"),
    "calibrate": ("psa_vlm.eval.calibrate", "choose per-layer PSA settings under an error target; write a JSON config"),
    "build-tiny": ("psa_vlm.models.tiny", "build the tiny offline Qwen2.5-VL checkpoint into a directory"),
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psa-vlm", description="Pyramid Sparse Attention for Qwen2.5-VL")
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
        parser.print_usage(sys.stderr)
        print(f"psa-vlm: error: unknown command {command!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    sub_parser = argparse.ArgumentParser(prog=f"psa-vlm {command}", description=SUBCOMMANDS[command][1])
    sub_parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(rest)
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
    sys.exit(main())
