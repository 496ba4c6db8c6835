"""benchmarks/report.py: RESULTS.md's tables are what benchmarks/results/*.json render."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
REPORT = BENCH / "report.py"


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = load_report()


@pytest.fixture
def copies(tmp_path):
    """Copies of the results folder and RESULTS.md."""
    results = tmp_path / "results"
    shutil.copytree(BENCH / "results", results)
    markdown = tmp_path / "RESULTS.md"
    shutil.copyfile(BENCH / "RESULTS.md", markdown)
    return results, markdown


def outside_markers(text: str) -> list[str]:
    return re.split(r"<!-- table: [\w-]+ -->\n.*?<!-- /table -->", text, flags=re.DOTALL)


def test_committed_tables_are_rendered():
    done = subprocess.run(
        [sys.executable, str(REPORT), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_table_has_its_marker_and_source_line():
    text = (BENCH / "RESULTS.md").read_text()
    names = re.findall(r"<!-- table: ([\w-]+) -->", text)
    assert sorted(names) == sorted(n for tables in report.RENDERERS.values() for n in tables)
    assert text.count("<!-- /table -->") == len(names)
    assert "table: gpu_check" not in text
    assert "| channels-last images/s |" in text  # the train_step table, fp32 and bf16 columns
    assert "| bf16 AMP, channels-last |" in text


def test_changed_number_changes_the_table(copies, capsys):
    results, markdown = copies
    before = markdown.read_bytes()
    assert report.run(results, markdown, check=True) == 0
    data = json.loads((results / "loader.json").read_text())
    torch_row, dali_row = data["rows"][:2]  # 64 px, 1 thread: the torch DataLoader, then DALI
    old_rate = torch_row["images_per_second"]
    torch_row["images_per_second"] = 1234.4
    (results / "loader.json").write_text(json.dumps(data))
    dali = dali_row["images_per_second"]

    assert report.run(results, markdown, check=True) == 1
    assert "| 64 | 1 | 1234 |" in capsys.readouterr().out  # the diff
    assert markdown.read_bytes() == before  # --check writes nothing

    assert report.run(results, markdown) == 0
    after = markdown.read_text()
    assert f"| 64 | 1 | 1234 | {dali:.0f} | {dali / 1234.4:.2f} |" in after
    assert f"| 64 | 1 | {old_rate:.0f} |" not in after
    assert report.run(results, markdown, check=True) == 0


def test_text_outside_markers_is_kept(copies):
    results, markdown = copies
    text = markdown.read_bytes().decode()
    # Different tables and surrounding text that is not plain ASCII or LF-only.
    title = "# Benchmark résults\r\n\n  trailing  \n"
    text = text.replace("# Benchmark results\n", title)
    loader = re.compile(r"(<!-- table: loader -->\n).*?(<!-- /table -->)", re.DOTALL)
    edited = loader.sub(r"\1stale\n\2", text)
    markdown.write_bytes(edited.encode())
    assert report.run(results, markdown) == 0
    rendered = markdown.read_bytes().decode()
    assert outside_markers(rendered) == outside_markers(edited)
    assert "stale" not in rendered
    assert rendered == text


def test_unknown_marker_is_an_error(copies):
    results, markdown = copies
    markdown.write_text(markdown.read_text() + "<!-- table: nope -->\n<!-- /table -->\n")
    with pytest.raises(SystemExit, match="nope"):
        report.run(results, markdown)
