"""`tandem loadtest` smoke run: ~30 s of headless Locust against the shared local stack.

Only that requests succeeded and the report was written; the numbers of a 2-core CI runner
say nothing about performance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.cli import run_loadtest
from loadtest.report import (
    LOCUST_HTML,
    PLOT_PNG,
    REPORT_HTML,
    REQUESTS_CSV,
    SUMMARY_CSV,
    SUMMARY_JSON,
)

SMOKE_SECONDS = 30


@pytest.mark.timeout(SMOKE_SECONDS + 240)
def test_loadtest_smoke(cluster, tmp_path: Path):
    summary = run_loadtest(
        cluster.url,
        workload="shared-prefix",
        shape="steady",
        duration_s=SMOKE_SECONDS,
        users=2,
        out_dir=tmp_path,
        max_tokens=16,
        # Short shared prompts: the point is the plumbing, not the prefill cost.
        extra_args=("--system-prompt-tokens", "120", "--num-prefixes", "4"),
    )
    assert summary["succeeded"] > 0, summary
    assert summary["failed"] == 0, summary["errors"]
    assert summary["ttft_s"]["p50"] is not None and summary["output_tokens"] > 0
    for name in (REQUESTS_CSV, SUMMARY_JSON, SUMMARY_CSV, PLOT_PNG, REPORT_HTML, LOCUST_HTML, "locust_stats.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / SUMMARY_JSON).read_text())["requests"] == summary["requests"]
