"""Start-up time of the commands against a minimal typer app, as ratios measured in one run.

Each command runs in a fresh interpreter, ``--runs`` times, the commands interleaved (so a
busy machine slows them alike); the median wall time is reported, and its ratio to a
minimal typer app's ``--help`` (the floor any typer CLI pays: Python, typer, rich).
``--before DIR`` also times ``python -m cli.main --help`` of another checkout (e.g. the
commit before the lazy imports: ``git worktree add DIR <commit>``), with ``PYTHONPATH=DIR``.

    python benchmarks/startup.py --runs 7 --out benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MINIMAL = """
import typer
app = typer.Typer()
@app.command()
def main(name: str = typer.Option("x", help="A name.")) -> None:
    print(name)
app()
"""


def commands(before: Path | None) -> dict[str, tuple[list[str], dict[str, str]]]:
    sample = str(REPO / "samples" / "packnet-6task.safetensors")
    py = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = {
        "minimal typer app --help": ([py, "-c", MINIMAL, "--help"], env),
        "packnet --help": ([py, "-m", "packnet_export.cli.main", "--help"], env),
        "packnet-export --help": ([py, "-m", "packnet_export.cli.export", "--help"], env),
        "packnet add-task --help": ([py, "-m", "packnet_export.cli.main", "add-task", "--help"], env),
        "packnet inspect SAMPLE --json": ([py, "-m", "packnet_export.cli.main", "inspect", sample, "--json"], env),
    }
    if before is not None:
        found["before: packnet --help"] = ([py, "-m", "cli.main", "--help"], {**env, "PYTHONPATH": str(before)})
        found["before: packnet inspect SAMPLE --json"] = ([py, "-m", "cli.main", "inspect", sample, "--json"],
                                                         {**env, "PYTHONPATH": str(before)})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--before", type=Path, help="Another checkout to time (python -m cli.main).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "startup.json")
    args = parser.parse_args()
    todo = commands(args.before)
    times: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(args.runs):
        for name, (argv, env) in todo.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["minimal typer app --help"])
    rows = {name: {"median_s": statistics.median(t), "min_s": min(t), "ratio_to_minimal": statistics.median(t) / floor}
            for name, t in times.items()}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"Python {platform.python_version()}", "load_average": os.getloadavg(), "runs": args.runs,
              "commands": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| command | median (s) | min (s) | vs minimal typer |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| `{name}` | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['ratio_to_minimal']:.1f}x |")


if __name__ == "__main__":
    main()
