"""The bench's recorded files (data/bench/*.json): what a record must carry (device, driver,
versions, date, command, results), reading them from any working directory, and reading them back
for notebook 07's tables and plots."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional

from moe_lab.core import paths

RECORD_KEYS = ("device", "driver", "torch", "triton", "date", "command", "results")
RESULT_KEYS = ("shape", "tokens", "d_model", "d_expert", "n_experts", "top_k", "backend", "pass", "status", "ms",
               "flops", "tflops", "weight_bytes", "min_bytes", "gbps")


def validate_record(record: dict) -> None:
    """Raise ValueError naming what is missing or malformed in a bench record (data/bench/*.json)."""
    if not isinstance(record, dict):
        raise ValueError(f"a bench record is a JSON object; got {type(record).__name__}")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"bench record lacks {missing}; expected the keys {RECORD_KEYS}")
    if not isinstance(record["results"], list) or not record["results"]:
        raise ValueError("bench record: 'results' must be a non-empty list")
    for i, r in enumerate(record["results"]):
        miss = [k for k in RESULT_KEYS if k not in r]
        if miss:
            raise ValueError(f"bench record: results[{i}] lacks {miss}")
        if r["status"] == "ok" and not (isinstance(r["ms"], (int, float)) and r["ms"] > 0 and math.isfinite(r["ms"])):
            raise ValueError(f"bench record: results[{i}] has status 'ok' but ms={r['ms']!r}")
    try:
        _dt.datetime.fromisoformat(record["date"])
    except (TypeError, ValueError):
        raise ValueError(f"bench record: date={record['date']!r} is not an ISO date") from None


def load_bench_records(directory: Optional[os.PathLike | str] = None) -> list[dict]:
    """Every valid *.json record in `directory` (default: the shipped data/bench, found by
    moe_lab.core.paths from any working directory), sorted by device name; each gains a "file" key.
    An invalid file raises ValueError naming it."""
    directory = paths.data_path("bench") if directory is None else Path(directory)
    records = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
            validate_record(rec)
        except (json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
        rec["file"] = str(path)
        records.append(rec)
    return sorted(records, key=lambda r: r["device"])


def record_label(record: dict) -> str:
    """'recorded on <device>, <date>[, commit <c>]' for plots and tables."""
    commit = record.get("commit")
    return f"recorded on {record['device']}, {record['date'][:10]}" + (f", commit {commit}" if commit else "")


def ok_results(record: dict, **match) -> list[dict]:
    """The results of a record whose status is 'ok' and whose fields equal `match`."""
    return [r for r in record["results"] if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]


def summarize(results: Iterable[dict]) -> str:
    """A plain-text table of bench results (GFLOP/s when every rate is under 1 TFLOP/s, as on a CPU)."""
    results = list(results)
    rates = [r["tflops"] for r in results if r["status"] == "ok"]
    unit, scale = ("TFLOP/s", 1.0) if rates and max(rates) >= 1 else ("GFLOP/s", 1e3)
    lines = [f"{'shape':9s} {'tokens':>6s} {'backend':>10s} {'pass':>16s} {'ms':>9s} {unit:>8s} "
             f"{'GB/s':>7s} {'%peak':>6s} {'%copy':>6s}  note"]
    for r in results:
        head = f"{r['shape']:9s} {r['tokens']:6d} {r['backend']:>10s} {r['pass']:>16s}"
        if r["status"] != "ok":
            lines.append(f"{head} {'-':>9s} {'':8s} {'':7s} {'':6s} {'':6s}  {r['status']}: {r.get('note', '')}")
            continue
        pk, bw = r.get("frac_peak_flops"), r.get("frac_copy_bw_weights")
        lines.append(f"{head} {r['ms']:9.3f} {r['tflops'] * scale:8.2f} {r['gbps']:7.1f} "
                     f"{'' if pk is None else f'{pk:6.0%}':>6s} {'' if bw is None else f'{bw:6.0%}':>6s}  {r.get('note', '')}")
    return "\n".join(lines)
