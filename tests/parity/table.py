"""Print the README's parity table: run the golden tests with recording on and summarise each check.

Usage: python tests/parity/table.py   (from the repository root; prints Markdown to stdout)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "parity.jsonl"
        env = dict(os.environ, CMRP_PARITY_RECORD=str(record))
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/parity"],
                              cwd=root, env=env, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            print("the parity tests failed; fix them before making the table", file=sys.stderr)
            return done.returncode
        rows = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    worst: dict[tuple[str, str], dict] = {}
    for row in rows:  # a check run for several inputs reports its worst case
        key = (row["model"], row["check"])
        if key not in worst or row["rel"] > worst[key]["rel"]:
            worst[key] = row
    print("| model | check | max abs error | max rel error |")
    print("| --- | --- | --- | --- |")
    for (model, check), row in sorted(worst.items()):
        print(f"| {model} | {check} | {row['abs']:.2e} | {row['rel']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
