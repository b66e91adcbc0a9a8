"""``kt <verb> [hydra overrides] [--flags]``: the command-line entry point.

Each verb lives in ``kt_core/commands/<verb>.py`` and exposes ``HELP`` and
``run(overrides, flags) -> int``. User mistakes (``KtError``) print one line and
exit 2; a traceback means a bug (``--debug`` shows it for KtError too).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Optional, Sequence

VERBS = ("run", "serve", "chat", "quantize", "merge", "sft", "dpo", "plan", "profile", "synth", "bench", "devices", "config", "doctor")


def _usage() -> str:
    lines = ["usage: kt <verb> [key=value ...] [--flags]", "", "verbs:"]
    for verb in VERBS:
        mod = importlib.import_module(f"kt_core.commands.{verb}")
        lines.append(f"  {verb:<9} {mod.HELP}")
    lines += ["", "overrides use Hydra syntax: topology=hybrid_1gpu device=rocm device.rocm.memory_gb=24",
              "flags: --help (per verb), --debug (tracebacks), -v (info logs)"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Never let torch auto-import out-of-tree device modules (a mismatched torch_npu
    # breaks `import torch`); the ascend plugin imports torch_npu itself when it matches.
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    from kt_core.runtime.omp import shorten_idle_spin  # (torch-free) before anything loads torch

    shorten_idle_spin()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"kt: unknown verb '{verb}'; verbs: {', '.join(VERBS)} (kt --help)", file=sys.stderr)
        return 2
    flags = {a for a in rest if a.startswith("-")}
    overrides = [a for a in rest if not a.startswith("-")]
    logging.basicConfig(level=logging.INFO if "-v" in flags else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    mod = importlib.import_module(f"kt_core.commands.{verb}")
    if "--help" in flags or "-h" in flags:
        print(f"kt {verb}: {mod.HELP}\n\n{mod.USAGE}")
        return 0
    unknown = flags - set(getattr(mod, "FLAGS", ())) - {"-v", "--debug"}
    if unknown:
        print(f"kt {verb}: unknown flag(s) {', '.join(sorted(unknown))}; see kt {verb} --help", file=sys.stderr)
        return 2
    from kt_core.errors import KtError

    try:
        return int(mod.run(overrides, flags) or 0)
    except KtError as exc:
        if "--debug" in flags:
            raise
        print(f"kt {verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m kt_core.cli
    sys.exit(main())
