"""`--record`: each case's last result into docs/reliability.json, and the measured table of
docs/reliability.md (between its `measured` markers) rewritten from it, so the document always
quotes the last run and the command that produced it."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from faults.checker import Result

DOCS = Path(__file__).resolve().parent.parent / "docs"
JSON = DOCS / "reliability.json"
MARKDOWN = DOCS / "reliability.md"
START, END = "<!-- measured:start -->", "<!-- measured:end -->"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=DOCS.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(results: list[Result], command: str) -> None:
    data = json.loads(JSON.read_text()) if JSON.exists() else {}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for result in results:
        data[result.case] = {**result.as_dict(), "line": result.line(), "command": command, "at": when,
                             "commit": _commit()}
    JSON.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    rewrite()


def rewrite() -> None:
    """docs/reliability.md's measured table, from docs/reliability.json."""
    data = json.loads(JSON.read_text()) if JSON.exists() else {}
    if MARKDOWN.exists():
        text = MARKDOWN.read_text()
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
        MARKDOWN.write_text(pattern.sub(lambda _: f"{START}\n{table(data)}\n{END}", text))


def table(data: dict[str, dict]) -> str:
    rows = ["| Case | Acked | Lost | Duplicated | Gaps | Reordered | Unacked | Recovery (s) | Late | Sender order "
            "| p99 (ms) | When, commit | Command |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    from faults.cases import CASES

    order = [*CASES, "soak"]
    for name, r in sorted(data.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)):
        recovery = "—" if r.get("recovery_s") is None else f"{r['recovery_s']:.1f}"
        seed = f" (seed {r['seed']})" if name == "soak" else ""
        rows.append(
            f"| `{name}`{seed} | {r['acked']} | {r['lost']} | {r['duplicated']} | {r['gaps']} | {r['reordered']} "
            f"| {r['unacked']} | {recovery} | {r['late']} | {r['sender_order']} | {r.get('latency_p99_ms')} "
            f"| {r['at']}, `{r['commit']}` "
            f"| `{r['command']}` |")
    return "\n".join(rows)
