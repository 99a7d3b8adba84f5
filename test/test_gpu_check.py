"""The prepared GPU check in its reduced CPU form, so the command a lent GPU
session runs first cannot rot: every step runs and the report is written."""

from __future__ import annotations

import json
import subprocess
import sys


def test_gpu_check_cpu_smoke_runs_every_step(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmark.gpu_check", str(tmp_path), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "report.json").read_text())
    failed = [(s["name"], s["output_tail"][-1500:]) for s in report["steps"] if not s["ok"]]
    assert done.returncode == 0 and not failed, failed or done.stderr[-2000:]
    names = [s["name"] for s in report["steps"]]
    assert len(names) == 4 and names[0] == "gpu tests"
    decode = report["steps"][1]["result"]["results"]
    assert [r["engine"] for r in decode] == ["radixserve", "no-cuda-graph"]
    assert 0 < decode[0]["roofline_share"]  # the bytes of a config-only model were counted
    offline = report["steps"][3]["result"]
    assert offline["throughput_ratio"]["transformers"] > 0
    assert "missing wheels" in (tmp_path / "report.md").read_text()
