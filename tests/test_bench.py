"""`sf bench`: a real benchmark run into a folder, the summary of every committed result, the README table."""

from __future__ import annotations

import json

from spatial_forcing.bench import README_END, README_START, RESULTS, markdown, summarise, update_readme
from spatial_forcing.cli import main as sf_main


def test_every_committed_result_has_headline_figures():
    summary = summarise(RESULTS)
    assert len(summary) >= 6
    for file, s in summary.items():
        assert s["rows"], f"{file}: no headline figures"
        assert all(row[0] != "unreadable result" for row in s["rows"]), file
    table = markdown(summary)
    assert table.count("\n") == 2 + sum(len(s["rows"]) for s in summary.values())


def test_sf_bench_runs_a_benchmark_and_summarises_it(tmp_path, capsys):
    assert sf_main(["bench", "--only", "teacher", "--out-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "teacher_cpu.json").read_text())
    assert doc["preset"] == "tiny" and [r["views"] for r in doc["results"]] == [1, 2, 3]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ran"]["teacher"]["status"] == "ok"
    rows = summary["results"]["teacher_cpu.json"]["rows"]
    assert [r[0] for r in rows] == [f"tiny, {v} view(s), median" for v in (1, 2, 3)]
    assert "teacher_cpu.json" in (tmp_path / "SUMMARY.md").read_text()
    assert sf_main(["bench", "--only", "nope"]) == 2
    assert "unknown benchmarks ['nope']" in capsys.readouterr().err


def test_readme_table_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold table\n{README_END}\noutro\n")
    assert update_readme("| new |\n", readme)
    assert readme.read_text() == f"intro\n{README_START}\n| new |\n{README_END}\noutro\n"
    readme.write_text("no markers\n")
    assert not update_readme("| new |\n", readme)
