"""A PNG of a Locust run from its CSV history: users, delivered messages/s and latency percentiles
over time.

    .venv/bin/python loadtest/plot_history.py PREFIX_stats_history.csv --out run.png [--title ...]
        [--names "delivery,ack"] [--delivery-name delivery] [--delivery-scale N]

The input is what `locust --csv PREFIX --csv-full-history` writes to `PREFIX_stats_history.csv`
(Locust 2.47: `locust.stats.StatsCSVFileWriter`): every few seconds one row per request name and
one "Aggregated" row, with the user count, the current requests/s and failures/s, and response
time percentiles over the last seconds. Percentiles of a name without requests yet are "N/A".

Panels:
- users: the Aggregated rows' user count;
- rates: delivered messages/s (the `--delivery-name` rows' requests/s; the load test samples
  deliveries into Locust's statistics as "delivery 1/N", so that row's rate is multiplied by N
  unless `--delivery-scale` says otherwise), all requests/s and failures/s (Aggregated);
- latency: p50, p95 and p99 of the `--names` rows (default: every name but Aggregated), on a
  logarithmic scale past 1 ms (connect, join and delivery times differ by orders of magnitude).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

AGGREGATED = "Aggregated"
PERCENTILES = ("50%", "95%", "99%")
REQUIRED_COLUMNS = ("Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s", *PERCENTILES)
# "delivery 1/10": one delivery in 10 is recorded.
SAMPLED_EVERY = re.compile(r"\s1/(\d+)$")
# A line style per percentile, a colour per request name: many names stay readable.
PERCENTILE_STYLES = {"50%": ":", "95%": "--", "99%": "-"}
# Elapsed time in minutes past 20 minutes: seconds would be unreadable numbers on the axis.
MINUTES_AFTER_S = 1200
# 12 x 10 inches at 100 dpi: 1200 x 1000 pixels, readable in docs and in a browser.
FIGURE_INCHES = (12, 10)
DPI = 100


@dataclass(frozen=True, slots=True)
class Row:
    timestamp: int
    users: int
    type: str
    name: str
    requests_per_s: float
    failures_per_s: float
    percentiles: dict[str, float]  # "50%" -> ms, NaN for N/A

    @property
    def label(self) -> str:
        return f"{self.type} {self.name}".strip()


def number(text: str) -> float:
    """A CSV cell as a number; Locust writes N/A for percentiles of a name without requests."""
    text = text.strip()
    if text in ("", "N/A"):
        return math.nan
    return float(text)


def load_history(path: Path) -> list[Row]:
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}: is it a Locust *_stats_history.csv "
                f"(locust --csv PREFIX --csv-full-history)? Found: {', '.join(reader.fieldnames or []) or 'nothing'}"
            )
        rows = []
        # Locust keeps writing a name's last Requests/s after its requests stop (the rate of its
        # last window, not of the row's second): a total that did not move means no requests.
        totals: dict[tuple[str, str], float] = {}
        for lineno, cells in enumerate(reader, start=2):
            try:
                key = (cells["Type"] or "", cells["Name"] or "")
                total = number(cells.get("Total Request Count") or "")
                idle = not math.isnan(total) and totals.get(key) == total
                totals[key] = total
                rows.append(Row(
                    timestamp=int(number(cells["Timestamp"])), users=int(number(cells["User Count"])),
                    type=key[0], name=key[1],
                    requests_per_s=0.0 if idle else number(cells["Requests/s"]),
                    failures_per_s=0.0 if idle else number(cells["Failures/s"]),
                    percentiles={p: number(cells[p]) for p in PERCENTILES},
                ))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: not a history row ({exc})") from None
    if not rows:
        raise ValueError(f"{path}: no rows under the header (did the run last a few seconds?)")
    return rows


def name_matches(name: str, wanted: str) -> bool:
    """`delivery` picks "delivery" and "delivery 1/10": names may carry a suffix."""
    return name == wanted or name.startswith(wanted + " ")


def delivered_per_s(rows: Sequence[Row], delivery_name: str, scale: float | None) -> tuple[dict[int, float], str]:
    """Timestamp -> delivered messages/s, summed over the rows that count deliveries; and where
    the figure came from ("delivery 1/10 x 10"), for the legend."""
    rates: dict[int, float] = defaultdict(float)
    sources: dict[str, float] = {}
    for row in rows:
        if row.name == AGGREGATED or not name_matches(row.name, delivery_name):
            continue
        sampled = SAMPLED_EVERY.search(row.name)
        factor = scale if scale is not None else (int(sampled.group(1)) if sampled else 1)
        sources[row.name] = factor
        if not math.isnan(row.requests_per_s):
            rates[row.timestamp] += row.requests_per_s * factor
    return dict(rates), ", ".join(f"{name} x {factor:g}" for name, factor in sorted(sources.items()))


def render(
    rows: Sequence[Row], *, title: str, names: Sequence[str] | None = None, delivery_name: str = "delivery",
    delivery_scale: float | None = None,
) -> Figure:
    """The figure: users, rates and latency panels sharing the time axis."""
    start = min(r.timestamp for r in rows)
    span = max(r.timestamp for r in rows) - start
    unit, divisor = ("min", 60.0) if span > MINUTES_AFTER_S else ("s", 1.0)

    def elapsed(timestamps: Sequence[int]) -> list[float]:
        return [(t - start) / divisor for t in timestamps]

    aggregated = [r for r in rows if r.name == AGGREGATED]
    per_name = [r for r in rows if r.name != AGGREGATED]
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    users_ax, rates_ax, latency_ax = figure.subplots(3, 1, sharex=True, height_ratios=(1, 1.2, 1.6))
    figure.suptitle(title)

    users_ax.set_title("Users")
    users_ax.plot(elapsed([r.timestamp for r in aggregated]), [r.users for r in aggregated], label="users")
    users_ax.set_ylabel("users")

    rates_ax.set_title("Rates")
    delivered, source = delivered_per_s(rows, delivery_name, delivery_scale)
    if delivered:
        times = sorted(delivered)
        rates_ax.plot(elapsed(times), [delivered[t] for t in times], linewidth=2,
                      label=f"delivered messages/s ({source} requests/s)")
    else:
        rates_ax.set_title(f"Rates (no {delivery_name!r} rows: delivered messages/s not shown)")
    rates_ax.plot(elapsed([r.timestamp for r in aggregated]), [r.requests_per_s for r in aggregated],
                  linewidth=1, label="all requests/s (Aggregated)")
    rates_ax.plot(elapsed([r.timestamp for r in aggregated]), [r.failures_per_s for r in aggregated],
                  color="tab:red", linewidth=1, label="failures/s (Aggregated)")
    rates_ax.set_ylabel("per second")
    rates_ax.legend(loc="upper left", fontsize="small")

    # Without --csv-full-history Locust writes only the Aggregated rows: plot those, and say so.
    series_rows = per_name or aggregated
    latency_ax.set_title("Latency" if per_name else "Latency (Aggregated only: run Locust with --csv-full-history)")
    by_label: dict[str, list[Row]] = defaultdict(list)
    for row in series_rows:
        if names is None or any(name_matches(row.name, wanted) for wanted in names):
            by_label[row.label].append(row)
    colours = itertools.cycle(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"])
    for label, series in sorted(by_label.items()):
        if all(math.isnan(r.percentiles[p]) for r in series for p in PERCENTILES):
            continue  # never answered: nothing to draw
        colour = next(colours)
        for percentile, style in PERCENTILE_STYLES.items():
            latency_ax.plot(elapsed([r.timestamp for r in series]), [r.percentiles[percentile] for r in series],
                            linestyle=style, color=colour, label=f"{label} p{percentile.rstrip('%')}")
    latency_ax.set_yscale("symlog", linthresh=1.0)
    latency_ax.set_ylabel("ms")
    latency_ax.set_xlabel(f"time since start ({unit})")
    if latency_ax.lines:
        latency_ax.legend(loc="upper left", fontsize="x-small", ncol=3)
    for ax in (users_ax, rates_ax, latency_ax):
        ax.grid(True, alpha=0.3)
    return figure


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("history", type=Path, help="PREFIX_stats_history.csv of locust --csv-full-history")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default=None, help="the figure's title (default: the CSV's name)")
    parser.add_argument("--names", default=None,
                        help='request names for the latency panel, comma-separated, e.g. "delivery,ack" '
                             "(a name also picks its suffixed forms, such as 'delivery 1/10'); default: all")
    parser.add_argument("--delivery-name", default="delivery",
                        help="the request name counting delivered messages (default %(default)s)")
    parser.add_argument("--delivery-scale", type=float, default=None,
                        help="multiply its rate by this (default: N of a 'NAME 1/N' sampled name, else 1)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names else None
    try:
        rows = load_history(args.history)
    except (OSError, ValueError) as exc:
        print(f"plot_history: {exc}", file=sys.stderr)
        return 2
    figure = render(rows, title=args.title or args.history.name, names=names, delivery_name=args.delivery_name,
                    delivery_scale=args.delivery_scale)
    figure.savefig(args.out, format="png")
    print(f"plot_history: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
