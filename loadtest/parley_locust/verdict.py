"""Pass or fail: the thresholds, read from Locust's statistics and the users' counts."""

from __future__ import annotations

from typing import Any

# What breaks Parley's promise: any of these above zero fails the run.
PROMISE = ("lost", "gaps", "reordered", "duplicates", "mismatched", "stored_twice")


def failures(summary: dict[str, Any], stats: Any, options: Any) -> list[str]:
    """Each threshold the run missed, said in words; empty when it passed."""
    found: list[str] = []
    connects, connect_errors = int(summary.get("connects", 0)), int(summary.get("connect_errors", 0))
    attempts = connects + connect_errors
    if attempts == 0:
        found.append("no user connected")
    elif connects / attempts < options.min_connect_success:
        found.append(f"connect success {connects / attempts:.4f} < {options.min_connect_success}")
    for key in PROMISE:
        if int(summary.get(key, 0)) > 0:
            found.append(f"{key}={summary[key]} (must be 0)")
    errors = summary.get("errors", {}) or {}
    if errors.get("unverified"):
        found.append(f"{errors['unverified']} users could not finish the end-of-run check")
    frames = sum(count for code, count in errors.items() if code != "unverified")
    if frames > options.max_error_frames:
        by_code = ", ".join(f"{code}={count}" for code, count in sorted(errors.items()) if code != "unverified")
        found.append(f"{frames} error frames > {options.max_error_frames} ({by_code})")
    entry = _delivery_entry(stats)
    if int(summary.get("acked", 0)) > 0 and entry is None:
        found.append("messages were acked but no delivery was timed")
    elif entry is not None and entry.num_requests:
        p99 = entry.get_response_time_percentile(0.99)
        if p99 > options.max_delivery_p99_ms:
            found.append(f"delivery p99 {p99:.0f} ms > {options.max_delivery_p99_ms:.0f} ms")
    return found


def _delivery_entry(stats: Any) -> Any:
    for (name, method), entry in stats.entries.items():
        if method == "WS" and name.startswith("delivery"):
            return entry
    return None


def one_line(summary: dict[str, Any], stats: Any, failed: list[str]) -> str:
    """The run in one machine-readable line (as make bench's last line)."""
    entry = _delivery_entry(stats)
    p99 = entry.get_response_time_percentile(0.99) if entry is not None and entry.num_requests else float("nan")
    keys = ("connects", "connect_errors", "sent", "acked", "unacked", "deliveries", "late", "lost", "gaps",
            "reordered", "duplicates", "mismatched", "stored_twice", "reconnects", "resumes", "reloads")
    fields = " ".join(f"{key}={summary.get(key, 0)}" for key in keys)
    errors = sum((summary.get("errors") or {}).values())
    result = "FAIL" if failed else "PASS"
    return f"parley_loadtest {fields} error_frames={errors} delivery_p99_ms={p99:.0f} result={result}"
