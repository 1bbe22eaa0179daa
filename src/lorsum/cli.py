"""The ``lorsum`` command line: ``lorsum compare`` and ``lorsum report``.

Both run the benchmark harness, which lives in the repository's ``benchmarks/`` folder and not
in the installed package (it trains models and plots; it is not library code). The command finds
that folder in the current directory or one of its parents, or beside an editable install, and
says so clearly when there is none.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

from lorsum._version import __version__

__all__ = ["find_harness_root", "main"]

COMMANDS = {
    "compare": "train LoRSum and every baseline on a task and compare them (default: synthetic)",
    "report": "write a markdown report from the stored results of `lorsum compare`",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorsum`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"lorsum {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"lorsum: error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    root = find_harness_root(_candidates())
    if root is None:
        print(
            f"lorsum {command}: error: the benchmark harness (benchmarks/) was not found. It is "
            "part of a lorsum source checkout, not of the installed package: run this command "
            "inside the repository (or from an editable install, `pip install -e .`).",
            file=sys.stderr,
        )
        return 2
    return _harness_module(root, command).main(rest)


def find_harness_root(candidates: Iterable[Path]) -> Path | None:
    """The first directory holding both ``pyproject.toml`` and ``benchmarks/compare.py``."""
    for directory in candidates:
        if (directory / "pyproject.toml").is_file() and (
            directory / "benchmarks" / "compare.py"
        ).is_file():
            return directory
    return None


def _candidates() -> list[Path]:
    cwd = Path.cwd().resolve()
    # An editable install imports lorsum from <repo>/src/lorsum: the repository is two levels up.
    package_root = Path(__file__).resolve().parents[2]
    return [cwd, *cwd.parents, package_root]


def _harness_module(root: Path, command: str) -> ModuleType:
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"benchmarks.{command}")
    if root not in Path(module.__file__).resolve().parents:
        raise ImportError(f"benchmarks.{command} was imported from {module.__file__}, not {root}")
    return module


def _usage() -> str:
    lines = ["usage: lorsum {compare,report} [options]   (lorsum COMMAND --help for each)", ""]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
