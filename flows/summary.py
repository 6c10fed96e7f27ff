"""The end of ``make demo``: per stage, what it made, its headline metrics and where to look.

    python -m flows.summary [--root .]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facedetail.io.report import StageView, summary_text
from flows.dag import load_stage, stage_order


def views(root: Path) -> list[StageView]:
    """One view per stage of ``dvc.yaml``, in DAG order."""
    stages = [load_stage(module) for _, module in stage_order(root)]
    return [StageView(s.name, s.out_dir, s.metrics, s.headline, s.look_at, s.items) for s in stages]


def main(argv: list[str] | None = None) -> int:
    """Print the summary of the outputs under ``--root``."""
    parser = argparse.ArgumentParser(prog="python -m flows.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: cwd)")
    args = parser.parse_args(argv)
    sys.stdout.write(summary_text(views(args.root), args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
