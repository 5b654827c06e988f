"""Start-up time of ``import paymaster`` and ``paymaster --help``, measured on this machine.

    .venv/bin/python bench/startup_bench.py            # median of 7 fresh processes each
    .venv/bin/python bench/startup_bench.py --runs 15

Each figure is the median wall time of N fresh subprocesses (after one untimed warm-up run
that fills the OS file cache), each started from scratch with this interpreter:
``python -c "import paymaster"`` and the installed ``paymaster --help`` console script.
It is section 6 of ``ledger_bench.py`` (``make bench``, and its ``--quick`` run).
Diagnose a figure with ``python -X importtime -c "import paymaster"``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

RUNS = 7
IMPORT_TARGET_S = 0.6  # the issue (#16, item 7): `import paymaster` <= 0.6 s
HELP_TARGET_S = 0.5  # the issue (#16, item 7): `paymaster --help` <= 0.5 s


@dataclass(frozen=True)
class Startup:
    label: str
    command: list[str]
    target_s: float
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def met(self) -> bool:
        return self.median <= self.target_s


def paymaster_script() -> list[str]:
    """The ``paymaster`` console script beside this interpreter (else the one on PATH)."""
    beside = Path(sys.executable).with_name("paymaster")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("paymaster")
    if found is None:
        raise SystemExit("no `paymaster` console script: install the package first")
    return [found]


def time_once(command: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def measure(label: str, command: list[str], target_s: float, runs: int) -> Startup:
    time_once(command)  # warm-up, not counted
    return Startup(label, command, target_s, [time_once(command) for _ in range(runs)])


def run_startup(runs: int = RUNS) -> list[Startup]:
    return [
        measure(
            "import paymaster",
            [sys.executable, "-c", "import paymaster"],
            IMPORT_TARGET_S,
            runs,
        ),
        measure("paymaster --help", [*paymaster_script(), "--help"], HELP_TARGET_S, runs),
    ]


def print_startup(console: Console, results: list[Startup], runs: int) -> None:
    table = Table(
        title=f"6. Start-up time (median of {runs} fresh processes, seconds)",
        title_justify="left",
        title_style="bold",
    )
    for i, column in enumerate(("command", "median s", "min s", "max s", "target s", "status")):
        table.add_column(column, justify="left" if i in (0, 5) else "right")
    for r in results:
        table.add_row(
            r.label,
            f"{r.median:.3f}",
            f"{min(r.samples):.3f}",
            f"{max(r.samples):.3f}",
            f"<= {r.target_s:.1f}",
            "[green]MET[/]" if r.met else "[red]NOT MET[/]",
        )
    console.print(table)
    for r in results:
        console.print(f"  [dim]{r.label}: {' '.join(r.command)}[/]", highlight=False)
    console.print(
        "  [dim]Measured on this machine, in this run: wall time of each subprocess from "
        "start to exit, after one untimed warm-up run; PYTHON* variables cleared.[/]",
        highlight=False,
    )
    console.print()


def startup_section(console: Console, progress: Console, runs: int = RUNS) -> list[Startup]:
    """Run and print this benchmark (section 6 of ``ledger_bench.py``)."""
    progress.print(f"start-up: {runs} fresh processes per command")
    results = run_startup(runs)
    print_startup(console, results, runs)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS, help=f"(default: {RUNS})")
    args = parser.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=210)
    startup_section(console, Console(stderr=True), args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
