"""`loadtest/plot_history.py`: the PNG of a Locust run (issue 12, "Evidence").

The CSV history is real: made in this module by a short headless Locust run (`--csv-full-history`)
against a throwaway HTTP server on 127.0.0.1. Its users record an HTTP request and, as the load
test's users do, a sampled WebSocket "delivery 1/10" with its latency.
"""

from __future__ import annotations

import csv
import math
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtest import plot_history

pytestmark = pytest.mark.slow

LOCUSTFILE = textwrap.dedent("""
    import random

    from locust import HttpUser, constant, task


    class Reader(HttpUser):
        wait_time = constant(0.05)

        @task
        def read(self):
            self.client.get("/", name="page")
            self.environment.events.request.fire(
                request_type="WS", name="delivery 1/10", response_time=random.uniform(5, 50),
                response_length=0, exception=None, context={})
""")
RUN_SECONDS = 5


class Quiet(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real `PREFIX_stats_history.csv` of Locust 2.47."""
    folder = tmp_path_factory.mktemp("locust")
    (folder / "locustfile.py").write_text(LOCUSTFILE)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        subprocess.run(
            [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "4", "-r", "4",
             "-t", f"{RUN_SECONDS}s", "--host", f"http://127.0.0.1:{server.server_port}", "--csv", "run",
             "--csv-full-history", "--only-summary", "--loglevel", "WARNING"],
            cwd=folder, check=True, capture_output=True, timeout=60,
        )
    finally:
        server.shutdown()
    yield folder / "run_stats_history.csv"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_command_writes_a_png_of_the_run(history, tmp_path):
    out = tmp_path / "run.png"
    assert plot_history.main([str(history), "--out", str(out), "--title", "smoke"]) == 0
    assert png_size(out) == (1200, 1000)
    # Three panels of lines and text: far more than an empty canvas compresses to.
    assert out.stat().st_size > 30_000


def test_the_panels_show_users_delivered_messages_and_percentiles(history):
    rows = plot_history.load_history(history)
    figure = plot_history.render(rows, title="t")
    users_ax, rates_ax, latency_ax = figure.axes
    assert [ax.get_title() for ax in figure.axes] == ["Users", "Rates", "Latency"]
    assert max(users_ax.lines[0].get_ydata()) == 4

    delivered = next(line for line in rates_ax.lines if line.get_label().startswith("delivered messages/s"))
    assert "delivery 1/10 x 10" in delivered.get_label()
    sampled = [r.requests_per_s for r in rows if r.name == "delivery 1/10"]
    # One delivery in ten is recorded: the plotted rate is ten times the row's.
    assert max(delivered.get_ydata()) == pytest.approx(10 * max(sampled))
    assert max(sampled) > 0

    labels = {line.get_label() for line in latency_ax.lines}
    assert labels == {f"{name} p{p}" for name in ("GET page", "WS delivery 1/10") for p in (50, 95, 99)}
    p99 = next(line for line in latency_ax.lines if line.get_label() == "WS delivery 1/10 p99")
    assert 5 <= max(v for v in p99.get_ydata() if not math.isnan(v)) <= 60  # the fired 5-50 ms


def test_names_pick_the_latency_series(history):
    figure = plot_history.render(plot_history.load_history(history), title="t", names=["delivery"])
    assert {line.get_label() for line in figure.axes[2].lines} == {f"WS delivery 1/10 p{p}" for p in (50, 95, 99)}


def test_na_cells_are_gaps_not_errors(history, tmp_path):
    with history.open(newline="") as file:
        rows = list(csv.DictReader(file))
    rows[0].update({"50%": "N/A", "95%": "N/A", "99%": "N/A"})
    edited = tmp_path / "na_stats_history.csv"
    with edited.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    loaded = plot_history.load_history(edited)
    assert all(math.isnan(loaded[0].percentiles[p]) for p in ("50%", "95%", "99%"))
    assert plot_history.main([str(edited), "--out", str(tmp_path / "na.png")]) == 0


def test_a_history_without_full_history_plots_the_aggregated_rows(history, tmp_path):
    lines = history.read_text().splitlines()
    aggregated = tmp_path / "agg_stats_history.csv"
    aggregated.write_text("\n".join([lines[0], *(line for line in lines[1:] if ",Aggregated," in line)]) + "\n")
    figure = plot_history.render(plot_history.load_history(aggregated), title="t")
    assert "run Locust with --csv-full-history" in figure.axes[2].get_title()
    assert "no 'delivery' rows" in figure.axes[1].get_title()


def test_a_csv_missing_required_columns_is_a_clear_error(history, tmp_path, capsys):
    with history.open(newline="") as file:
        rows = list(csv.DictReader(file))
    broken = tmp_path / "broken.csv"
    with broken.open("w", newline="") as file:
        columns = [c for c in rows[0] if c not in ("99%", "User Count")]
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "broken.png"
    assert plot_history.main([str(broken), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "missing column(s) User Count, 99%" in error and "--csv-full-history" in error
    assert not out.exists()


def test_a_history_with_no_rows_is_a_clear_error(history, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text(history.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="no rows under the header"):
        plot_history.load_history(empty)


def test_the_script_runs_from_the_command_line(history, tmp_path):
    out = tmp_path / "cli.png"
    script = Path(plot_history.__file__)
    done = subprocess.run([sys.executable, str(script), str(history), "--out", str(out), "--names", "page"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert png_size(out) == (1200, 1000)
