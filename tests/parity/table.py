"""Print the parity table of docs/parity.md: run the golden tests with recording on and summarise each check.

Usage: python tests/parity/table.py [--write]   (prints Markdown to stdout; --write also puts the table into
docs/parity.md in place of the one there)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HEADER = "| model | check | max abs error | max rel error |"
DOC = Path("docs") / "parity.md"


def replace_table(doc: str, table: str) -> str:
    """`doc` with the Markdown table that starts at HEADER (up to the first line not starting `|`) replaced."""
    lines = doc.split("\n")
    if HEADER not in lines:
        raise SystemExit(f"{DOC}: no line {HEADER!r} to put the table under")
    start = lines.index(HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join([*lines[:start], *table.rstrip("\n").split("\n"), *lines[end:]])


def main(argv: list[str]) -> int:
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
    table = [HEADER, "| --- | --- | --- | --- |"]
    table += [f"| {model} | {check} | {row['abs']:.2e} | {row['rel']:.2e} |" for (model, check), row in sorted(worst.items())]
    print("\n".join(table))
    if "--write" in argv:
        doc = root / DOC
        doc.write_text(replace_table(doc.read_text(encoding="utf-8"), "\n".join(table)), encoding="utf-8")
        print(f"written into {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
