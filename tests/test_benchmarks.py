"""The benchmark suite runs end to end (`python -m benchmarks --quick`) and reports every section; no timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_suite_writes_json_and_markdown_with_every_section(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.__main__ import SECTIONS

    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "bench.json").read_text())
    markdown = (tmp_path / "out" / "bench.md").read_text()
    assert results["threads"] == 1 and results["quick"] is True
    assert set(results["sections"]) == set(SECTIONS)
    for section, rows in results["sections"].items():
        assert rows, f"section {section} has no rows"
        assert f"## {section}" in markdown
        for r in rows:
            assert {"name", "ms", "ratio", "target", "met"} <= set(r)
            assert r["ms"] and all(ms > 0 for ms in r["ms"].values())
            assert (r["met"] is None) == (r["target"] is None or r["ratio"] is None)
            assert r["name"] in markdown


def test_the_commands_that_only_read_runs_import_no_heavy_library(tmp_path, monkeypatch):
    """`runs list` and `runs show` over written study runs read JSON only: no torch, Lightning or plotting (start-up)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.bench_startup import heavy_imports, write_runs

    write_runs(tmp_path, 3)
    assert heavy_imports(["-m", "toylab", "runs", "list", "--out", str(tmp_path)]) == []
    assert heavy_imports(["-m", "toylab", "runs", "show", str(tmp_path / "expert-specialization" / "run00")]) == []
    assert heavy_imports(["-m", "toylab", "study", "list"]) == []  # the studies' source is read, not imported
