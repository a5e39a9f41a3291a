"""Start-up time of the commands against a minimal typer app, as ratios measured in one run.

Each command runs in a fresh interpreter, ``--runs`` times, the commands interleaved (so a
busy machine slows them alike). Reported per command: the median wall time, the median CPU
time (user + system, from ``os.wait4``: far less sensitive than wall time to other work on a
shared machine) and its ratio to a minimal typer app's (the floor any typer CLI pays:
Python, typer, rich), and the peak RSS.
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


def commands(before: Path | None) -> dict[str, tuple[list[str], dict[str, str], Path]]:
    """name -> (argv, environment, working folder): ``python -m`` puts the working folder
    first on ``sys.path``, so the other checkout's commands run from it."""
    sample = str(REPO / "samples" / "packnet-6task.safetensors")
    py = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = {
        "minimal typer app --help": ([py, "-c", MINIMAL, "--help"], env, REPO),
        "packnet --help": ([py, "-m", "packnet_export.cli.main", "--help"], env, REPO),
        "packnet-export --help": ([py, "-m", "packnet_export.cli.export", "--help"], env, REPO),
        "packnet add-task --help": ([py, "-m", "packnet_export.cli.main", "add-task", "--help"], env, REPO),
        "packnet inspect SAMPLE --json": ([py, "-m", "packnet_export.cli.main", "inspect", sample, "--json"], env,
                                          REPO),
    }
    if before is not None:
        old = {**env, "PYTHONPATH": str(before)}
        found["before: packnet --help"] = ([py, "-m", "cli.main", "--help"], old, before)
        found["before: packnet inspect SAMPLE --json"] = ([py, "-m", "cli.main", "inspect", sample, "--json"], old,
                                                         before)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--before", type=Path, help="Another checkout to time (python -m cli.main).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "startup.json")
    args = parser.parse_args()
    todo = commands(args.before)
    wall: dict[str, list[float]] = {name: [] for name in todo}
    cpu: dict[str, list[float]] = {name: [] for name in todo}
    rss: dict[str, list[int]] = {name: [] for name in todo}
    for _ in range(args.runs):
        for name, (argv, env, cwd) in todo.items():
            start = time.perf_counter()
            child = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(child.pid, 0)
            wall[name].append(time.perf_counter() - start)
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode:
                raise SystemExit(f"{name} exited {child.returncode}")
            cpu[name].append(usage.ru_utime + usage.ru_stime)
            rss[name].append(usage.ru_maxrss * 1024)
    floor = statistics.median(cpu["minimal typer app --help"])
    rows = {name: {"wall_median_s": statistics.median(wall[name]), "cpu_median_s": statistics.median(cpu[name]),
                   "cpu_ratio_to_minimal": statistics.median(cpu[name]) / floor,
                   "peak_rss_mb": statistics.median(rss[name]) / 1e6} for name in todo}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"Python {platform.python_version()}", "load_average": os.getloadavg(), "runs": args.runs,
              "commands": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| command | CPU time (s) | vs minimal typer | wall (s) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| `{name}` | {r['cpu_median_s']:.2f} | {r['cpu_ratio_to_minimal']:.1f}x | {r['wall_median_s']:.2f} "
              f"| {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
