"""The course's text corpus: Python standard-library sources (notebooks 01, 02, 04).

A language model needs text to learn from, and every machine that runs the course already has
some: the source of Python's own standard library. A fixed, sorted list of its pure-Python modules
(STDLIB_FILES, all present from Python 3.10 to 3.13) is cleaned to what the tokenizer knows
(printable ASCII and newlines, tabs expanded) and joined, one separator line per file, into about
0.8 MB of text. That file ships in data/corpus/python_stdlib.txt, so every learner trains on the
same characters (the modules change a little between Python versions); data/corpus/README.md says
how it was built. The sources are under the PSF licence.

    python -m moe_lab corpus --build     # regenerate the shipped file from this Python
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

from moe_lab.core import paths
from moe_lab.core.arguments import at_least_1
from moe_lab.core.files import atomic_write_bytes, check_output_path

# Pure-Python modules present, and stable, in Python 3.10 - 3.13 (none of them became a package or
# a stub in that range). Sorted, so the corpus is the same whatever order they are listed in.
STDLIB_FILES = sorted([
    "abc.py", "argparse.py", "base64.py", "bisect.py", "calendar.py", "colorsys.py", "configparser.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py", "fnmatch.py",
    "fractions.py", "functools.py", "glob.py", "gzip.py", "heapq.py", "json/decoder.py", "json/encoder.py",
    "operator.py", "queue.py", "random.py", "sched.py", "shlex.py", "statistics.py", "string.py",
    "textwrap.py", "timeit.py",
])
SEPARATOR = "# ==== {name} ====\n"  # the line that opens each file in the corpus
SHIPPED = {"python_stdlib": "python_stdlib.txt"}  # corpus name -> its file in data/corpus/
CACHE_DIR = Path.home() / ".cache" / "moe_lab"  # where a corpus missing from data/ is built



def clean(text: str) -> str:
    """Keep what the tokenizer knows: printable ASCII and newlines (tabs become spaces, others dropped)."""
    text = text.replace("\r\n", "\n").expandtabs(4)
    return "".join(c for c in text if c == "\n" or 32 <= ord(c) <= 126)


def build_stdlib_corpus(out_path, target_chars: int = 1_000_000) -> Path:
    """Write the STDLIB_FILES of this Python, cleaned, to out_path; return the path.

    Files are taken in sorted order, each opened by a SEPARATOR line, until target_chars is reached;
    a file that would pass it is cut at a line end, so the corpus holds at most target_chars
    characters. Missing files are skipped. out_path is checked first (a folder, a path under a file or a
    folder we may not write in is an OutputPathError naming it); the file is written atomically (a
    temporary file, then a rename, the temporary file removed on any failure), so a reader never sees
    half of it.
    """
    if isinstance(target_chars, bool) or not isinstance(target_chars, int) or target_chars < 1:
        raise ValueError(f"build_stdlib_corpus(target_chars={target_chars!r}): expected a positive integer")
    check_output_path(out_path)
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for name in STDLIB_FILES:
        path = root / name
        if not path.exists():
            continue
        text = SEPARATOR.format(name=name) + clean(path.read_text(encoding="utf-8", errors="replace"))
        if total + len(text) > target_chars:
            text = text[: target_chars - total]
            text = text[: text.rfind("\n") + 1]  # end on a whole line ("" if none fits)
        parts.append(text)
        total += len(text)
        if total >= target_chars or not text:
            break
    out_path = Path(out_path)
    atomic_write_bytes(out_path, "".join(parts).encode("ascii"))
    return out_path


def corpus_path(name: str = "python_stdlib") -> Path:
    """Where the corpus `name` ships: data/corpus/<file> in the repository."""
    if name not in SHIPPED:
        raise ValueError(f"corpus name={name!r}: expected one of {sorted(SHIPPED)}")
    return paths.data_path("corpus", SHIPPED[name])


def load_corpus(name: str = "python_stdlib") -> str:
    """The text of a corpus: the shipped file, or (without the repository) one built into ~/.cache/moe_lab."""
    path = corpus_path(name)
    if not path.exists():
        path = CACHE_DIR / SHIPPED[name]
        if not path.exists():
            print(f"note: {corpus_path(name)} not found (moe_lab installed without its repository): building "
                  f"{path} from this Python's standard library ({sys.version.split()[0]}); it may differ slightly "
                  f"from the course's corpus.")
            build_stdlib_corpus(path)
    return path.read_text(encoding="ascii")


def main(argv=None) -> None:
    """`python -m moe_lab corpus --build`: regenerate data/corpus/python_stdlib.txt."""
    parser = argparse.ArgumentParser(prog="python -m moe_lab corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="regenerate data/corpus/python_stdlib.txt")
    parser.add_argument("--chars", type=at_least_1, default=1_000_000, help="the most characters to keep (>= 1)")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return
    try:
        check_output_path(corpus_path("python_stdlib"))
    except ValueError as exc:
        parser.error(f"the corpus file: {exc}")
    out = build_stdlib_corpus(corpus_path("python_stdlib"), args.chars)
    print(f"wrote {out} ({out.stat().st_size:,} characters) from Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
