"""Run every benchmark under bench/ in turn (``make bench``). Each prints its own ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = ["bench_conv.py", "bench_capture.py", "bench_generate.py"]


def main() -> int:
    here = Path(__file__).parent
    failed = []
    for name in BENCHES:
        print(f"\n=== {name}", flush=True)
        if subprocess.call([sys.executable, str(here / name)]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
