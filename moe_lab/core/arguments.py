"""argparse types shared by the package's commands: each refuses a bad value naming it, so a command
exits at once (status 2) before any work."""
from __future__ import annotations

import argparse

from moe_lab.core.files import check_output_path


def int_in(lo: int, hi: int, hint: str):
    """An argparse type: a whole number in [lo, hi], refused with `hint` otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value}: expected {hint}")
        return value
    return parse


positive_int = int_in(1, 2**63 - 1, "at least 1 (omit --steps for the preset's own count)")
at_least_1 = int_in(1, 2**63 - 1, "a whole number >= 1")
seed_int = int_in(0, 2**32 - 1, "an integer in [0, 2**32 - 1]")


def int_list(text: str) -> list[int]:
    """ "0-4" -> [0, 1, 2, 3, 4]; "1,2" -> [1, 2]."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def int_list_arg(text: str) -> list[int]:
    try:
        values = int_list(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers, e.g. 0-4 or 1,2") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a non-empty list of whole numbers >= 0")
    return values


def seed_list_arg(text: str) -> list[int]:
    """Seeds, e.g. "0-4" or "0,3": each a whole number in [0, 2**32 - 1]."""
    values = int_list_arg(text)
    if any(v > 2**32 - 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected seeds in [0, 2**32 - 1]")
    return values


def choice_list(*options: str):
    """An argparse type: a comma-separated list of names from `options`, e.g. "group,batch_mean"."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",")]
        bad = [n for n in names if n not in options]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list from {options}")
        return names
    return parse


def check_outputs(ap: argparse.ArgumentParser, outputs: dict) -> None:
    """Check each file a command will write before any work ({argument: path}; None is skipped): a
    folder, a path under a file or a folder we may not write in exits at once (argparse's usage error,
    status 2) naming the argument and the path."""
    for name, path in outputs.items():
        if path is None:
            continue
        try:
            check_output_path(path)
        except ValueError as exc:
            ap.error(f"argument {name}: {exc}")
