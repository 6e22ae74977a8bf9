"""The course's text corpus: Python standard-library sources (notebooks 01, 02, 04).

Every machine that runs the course has Python, so its standard library is material present
everywhere; a fixed selection of it ships in data/corpus/python_stdlib.txt so that every learner
trains on the same characters (the standard library differs slightly between Python versions).
It is distributed under the PSF licence (data/corpus/README.md).

    python -m moe_lab.data.corpus --build     # regenerate the shipped file from this Python
"""
from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

# pure-Python modules present, and stable, in Python 3.10 - 3.13
STDLIB_FILES = sorted([
    "abc.py", "argparse.py", "base64.py", "bisect.py", "calendar.py", "colorsys.py", "configparser.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py", "fnmatch.py",
    "fractions.py", "functools.py", "glob.py", "gzip.py", "heapq.py", "json/decoder.py", "json/encoder.py",
    "operator.py", "queue.py", "random.py", "sched.py", "shlex.py", "statistics.py", "string.py",
    "textwrap.py", "timeit.py",
])
SEPARATOR = "# ==== {name} ====\n"
SHIPPED = {"python_stdlib": "python_stdlib.txt"}


def data_dir() -> Path:
    """The repository's data/ folder."""
    import moe_lab

    return Path(moe_lab.__file__).resolve().parents[1] / "data"


def clean(text: str) -> str:
    """Keep what the tokenizer knows: printable ASCII and newlines (tabs become spaces)."""
    text = text.expandtabs(4).replace("\r\n", "\n")
    return "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)


def build_stdlib_corpus(out_path, target_chars: int = 1_000_000) -> Path:
    """Concatenate the fixed STDLIB_FILES (skipping missing ones) up to about target_chars."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for name in STDLIB_FILES:
        path = root / name
        if not path.exists() or total >= target_chars:
            continue
        text = SEPARATOR.format(name=name) + clean(path.read_text(encoding="utf-8", errors="ignore"))
        parts.append(text[: target_chars - total])
        total += len(parts[-1])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("".join(parts), encoding="ascii")
    return out_path


def load_corpus(name: str = "python_stdlib") -> str:
    """The shipped corpus; rebuilt into ~/.cache/moe_lab from this Python if data/ is not there."""
    if name not in SHIPPED:
        raise ValueError(f"load_corpus(name={name!r}): expected one of {sorted(SHIPPED)}")
    path = data_dir() / "corpus" / SHIPPED[name]
    if not path.exists():
        path = Path.home() / ".cache" / "moe_lab" / SHIPPED[name]
        if not path.exists():
            print(f"data/corpus not found (package installed without the repository): building {path} from this "
                  f"Python's standard library; numbers may differ slightly from the course's.")
            build_stdlib_corpus(path)
    return path.read_text(encoding="ascii")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="regenerate data/corpus/python_stdlib.txt")
    parser.add_argument("--chars", type=int, default=1_000_000)
    args = parser.parse_args()
    if args.build:
        out = build_stdlib_corpus(data_dir() / "corpus" / SHIPPED["python_stdlib"], args.chars)
        print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    else:
        parser.print_help()
