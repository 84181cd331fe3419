"""tests/chart: the Helm chart and the image, checked without a cluster or a Docker engine."""

from __future__ import annotations

import sys
from pathlib import Path

# The CRD helpers (defaults + schema as the API server applies them) live with the operator tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
