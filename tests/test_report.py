"""Reports: tables, plots and pages from results folders.

Two kinds of input are used. The first is a synthetic ID table shaped like a
full all-pythia sweep: 10 models x 154 checkpoints, some cells missing, failed
or flagged as duplicates. The second is tiny real runs of the estimator on
small matrices, stored through `raysweep.store` as a sweep stores them.
"""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raysweep import pages, plots, report, store
from raysweep.cli import app
from raysweep.schedules import PYTHIA_MODELS, SCHEDULES
from tests.support import sweeps

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKEN_ROWS = 300


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory) -> Path:
    """A finished all-pythia-shaped sweep: the ID table and the final cells' per-token LIDs."""
    out = tmp_path_factory.mktemp("sweep")
    rows = sweeps.pythia_sweep_rows()
    tokens = {row["cell_key"]: sweeps.synthetic_tokens(row, TOKEN_ROWS, seed=index)
              for index, row in enumerate(rows) if row["status"] == "ok" and row["step"] == 143_000}
    return sweeps.write_results(out, rows, cell_files=False, tokens=tokens)


@pytest.fixture(scope="module")
def sweep_report(sweep_folder) -> report.Report:
    return report.build_report(sweep_folder)


@pytest.fixture(scope="module")
def sweep_written(sweep_report, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("sweep-report")
    report.write_report(sweep_report, dest)
    return dest


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory) -> Path:
    """Three small matrices measured for real: a plane, a 5-d cube (with tokens), Gaussian noise."""
    out = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    plane = rng.random((400, 2)) @ rng.standard_normal((2, 12))
    cube = rng.random((400, 5)) @ rng.standard_normal((5, 24))
    noise = rng.standard_normal((400, 16))
    vocabulary = [f"word{index}" for index in range(400)]
    vocabulary[7] = "pipe|tick`"
    sweeps.measured_cell(out, "plane", plane, vocabulary)
    sweeps.measured_cell(out, "cube", cube, vocabulary)
    sweeps.measured_cell(out, "noise", noise, None)
    store.write_union(out)
    return out


# ---------------------------------------------------------------- helpers


def markdown_section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    following = re.search(r"\n## ", text[start + 1:])
    return text[start: start + 1 + following.start()] if following else text[start:]


def markdown_table(section: str) -> list[dict[str, str]]:
    """Parse the first GitHub table in a section; cells are split at unescaped pipes."""
    lines = []
    for line in section.splitlines():
        if line.startswith("| "):
            lines.append(line)
        elif lines:
            break
    split = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    headers = split[0]
    return [dict(zip(headers, cells)) for cells in split[2:]]


def gids(axis, prefix: str) -> list:
    return [artist for artist in axis.get_children() if (artist.get_gid() or "").startswith(prefix)]


def decode_png(data: bytes) -> np.ndarray:
    assert data.startswith(PNG_SIGNATURE)
    return matplotlib.image.imread(io.BytesIO(data), format="png")


class ResourceCollector(HTMLParser):
    """Collect every tag, every attribute that can load a resource, and the style text."""

    RESOURCE_ATTRIBUTES = {"src", "href", "srcset", "action", "data", "poster", "background", "formaction"}

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.references: list[tuple[str, str, str]] = []
        self.styles: list[str] = []
        self.meta: list[dict] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in self.RESOURCE_ATTRIBUTES or name == "style":
                self.references.append((tag, name, value or ""))
        if tag == "meta":
            self.meta.append(dict(attrs))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def parse_html(text: str) -> ResourceCollector:
    collector = ResourceCollector()
    collector.feed(text)
    return collector


def assert_self_contained(text: str) -> list[bytes]:
    """Assert that a page loads nothing from outside itself; return its embedded images."""
    page = parse_html(text)
    images = []
    for tag, name, value in page.references:
        assert (tag, name) == ("img", "src"), f"unexpected resource attribute {name} on <{tag}>"
        assert value.startswith("data:image/png;base64,"), value[:60]
        images.append(base64.b64decode(value.split(",", 1)[1], validate=True))
    for tag in ("script", "link", "iframe", "object", "embed", "base", "audio", "video", "source"):
        assert tag not in page.tags, f"page contains <{tag}>"
    for style in page.styles:
        assert "url(" not in style
        assert "@import" not in style
    policies = [meta.get("content", "") for meta in page.meta if meta.get("http-equiv") == "Content-Security-Policy"]
    assert policies == [pages.CONTENT_SECURITY_POLICY]
    return images


# ---------------------------------------------------------------- the synthetic sweep


def test_sweep_fixture_has_full_shape(sweep_folder):
    table = pq.read_table(sweep_folder / "id_table.parquet")
    assert table.schema == store.ID_TABLE_SCHEMA
    assert table.num_rows == len(PYTHIA_MODELS) * len(SCHEDULES["pythia"]) == 1540
    statuses = table.column("status").to_pylist()
    assert statuses.count("missing") == len(sweeps.MISSING)
    assert statuses.count("failed") == len(sweeps.FAILED)


def test_series_one_per_model_by_size(sweep_report):
    names = [item.name for item in sweep_report.series]
    assert names == [model.repo_id for model in PYTHIA_MODELS]
    for item in sweep_report.series:
        assert len(item.rows) == 154
        assert item.absent == ()
        assert item.family == "pythia"
        assert item.parameters == item.model.parameters


def test_final_row_skips_missing_revision(sweep_report):
    by_name = {item.name: item for item in sweep_report.series}
    assert by_name["EleutherAI/pythia-6.9b"].final_row["revision"] == "step142000"
    assert not by_name["EleutherAI/pythia-6.9b"].is_final_complete
    assert by_name["EleutherAI/pythia-12b"].final_row["revision"] == "step143000"
    assert by_name["EleutherAI/pythia-12b"].is_final_complete


def test_gaps_list_missing_failed_duplicates(sweep_report):
    gaps = sweep_report.gaps
    assert {(row["source"], row["revision"]) for row in gaps.missing} == sweeps.MISSING
    assert {(row["source"], row["revision"]) for row in gaps.failed} == sweeps.FAILED
    assert {(row["source"], row["revision"]): row["duplicate_of"] for row in gaps.duplicates} == sweeps.DUPLICATES
    assert gaps.absent == ()
    # pythia-6.9b's last step is missing, and only last steps have per-token files.
    assert gaps.without_tokens == ("EleutherAI/pythia-6.9b",)


def test_duplicates_not_on_curve(sweep_report):
    by_name = {item.name: item for item in sweep_report.series}
    curve = {row["revision"] for row in by_name["EleutherAI/pythia-2.8b"].curve_rows}
    assert "step40000" not in curve
    assert "step41000" not in curve
    assert "step30000" in curve


def test_sweep_writes_every_file(sweep_written):
    names = sorted(path.name for path in sweep_written.iterdir())
    assert names == sorted([plots.SIZE_FIGURE, plots.STEP_FIGURE, plots.HISTOGRAM_FIGURE,
                            report.MARKDOWN_NAME, report.HTML_NAME])


@pytest.mark.parametrize("name", [plots.SIZE_FIGURE, plots.STEP_FIGURE, plots.HISTOGRAM_FIGURE])
def test_sweep_png_is_valid(sweep_written, name):
    pixels = decode_png((sweep_written / name).read_bytes())
    height, width = pixels.shape[:2]
    assert height > 200
    assert width > 200
    assert pixels.std() > 0.01


def test_png_has_no_software_url(sweep_written):
    assert b"matplotlib.org" not in (sweep_written / plots.STEP_FIGURE).read_bytes()


def test_step_figure_series_and_markers(sweep_report):
    figure = plots.step_figure(sweep_report.series)
    id_axis, redundancy_axis = figure.axes
    for axis in (id_axis, redundancy_axis):
        assert len(gids(axis, "series:")) == 10
        duplicate_points = sum(len(line.get_xdata()) for line in gids(axis, "duplicate:"))
        assert duplicate_points == len(sweeps.DUPLICATES)
        missing_points = sum(len(line.get_xdata()) for line in gids(axis, "missing:"))
        assert missing_points == len(sweeps.MISSING)
        failed_points = sum(len(line.get_xdata()) for line in gids(axis, "failed:"))
        assert failed_points == len(sweeps.FAILED)
        assert gids(axis, "absent:") == []
    assert id_axis.get_xscale() == "symlog"
    assert id_axis.get_xlim()[0] < 0


def test_step_curve_values_match_table(sweep_report, sweep_folder):
    table = pq.read_table(sweep_folder / "id_table.parquet").to_pylist()
    expected = sorted((row["step"], row["id_mle"]) for row in table
                      if row["source"] == "EleutherAI/pythia-70m" and row["status"] == "ok")
    figure = plots.step_figure(sweep_report.series)
    (line,) = [line for line in gids(figure.axes[0], "series:") if line.get_gid().endswith("pythia-70m")]
    assert list(line.get_xdata()) == [step for step, _ in expected]
    assert list(line.get_ydata()) == pytest.approx([value for _, value in expected])


def test_step_figure_shows_step_zero(sweep_report):
    figure = plots.step_figure(sweep_report.series)
    line = gids(figure.axes[0], "series:")[0]
    assert line.get_xdata()[0] == 0
    assert figure.axes[0].get_xlim()[0] < 0 < figure.axes[0].get_xlim()[1]


def test_size_figure_uses_parameter_counts(sweep_report):
    figure = plots.size_figure(sweep_report.series)
    assert len(figure.axes) == 2
    id_axis, redundancy_axis = figure.axes
    assert id_axis.get_xscale() == "log"
    (line,) = gids(id_axis, "series:")
    assert list(line.get_xdata()) == [model.parameters for model in PYTHIA_MODELS]
    finals = [item.final_row["id_mle"] for item in sweep_report.series]
    assert list(line.get_ydata()) == pytest.approx(finals)
    (redundancy_line,) = gids(redundancy_axis, "series:")
    assert list(redundancy_line.get_ydata()) == pytest.approx([item.final_row["redundancy"]
                                                              for item in sweep_report.series])
    (partial,) = gids(id_axis, "partial:")
    assert list(partial.get_xdata()) == [6_857_302_016]


def test_histogram_panel_per_source_with_tokens(sweep_report):
    figure = plots.histogram_figure(sweep_report.token_lids)
    visible = [axis for axis in figure.axes if axis.get_visible()]
    assert len(visible) == 9
    for axis in visible:
        assert len(gids(axis, "hidden_size:")) == 1
        assert len(gids(axis, "id_mle:")) == 1
        assert len(gids(axis, "histogram:")) == plots.HISTOGRAM_BINS


def test_markdown_summary_matches_parquet(sweep_written, sweep_folder):
    text = (sweep_written / report.MARKDOWN_NAME).read_text()
    table = pq.read_table(sweep_folder / "id_table.parquet").to_pylist()
    by_cell = {(row["source"], row["revision"]): row for row in table}
    summary = markdown_table(markdown_section(text, "## Redundancy by source"))
    assert [line["source"] for line in summary] == [model.repo_id for model in PYTHIA_MODELS]

    for line in summary:
        row = by_cell[(line["source"], line["revision"])]
        assert row["status"] == "ok"
        assert float(line["ID (MLE)"]) == pytest.approx(row["id_mle"], abs=0.005)
        assert float(line["mean LID"]) == pytest.approx(row["id_mean"], abs=0.005)
        assert float(line["median LID"]) == pytest.approx(row["id_median"], abs=0.005)
        assert float(line["redundancy"]) == pytest.approx(row["redundancy"], abs=0.00005)
        assert int(line["hidden size"]) == row["hidden_size"]
        assert int(line["rows used"]) == row["rows_used"]
        assert line["k"] == str(row["k"])
    revisions = {line["source"]: line["revision"] for line in summary}
    assert revisions["EleutherAI/pythia-6.9b"] == "step142000"
    assert revisions["EleutherAI/pythia-14m"] == "step143000"


def test_markdown_cells_match_parquet(sweep_written, sweep_folder):
    text = (sweep_written / report.MARKDOWN_NAME).read_text()
    table = pq.read_table(sweep_folder / "id_table.parquet").to_pylist()
    by_cell = {(row["source"], row["revision"]): row for row in table}
    cells = markdown_table(markdown_section(text, "## All cells"))
    assert len(cells) == len(table)

    for line in cells:
        row = by_cell[(line["source"], line["revision"])]
        assert line["status"] == row["status"]
        if row["status"] == "ok":
            assert float(line["ID (MLE)"]) == pytest.approx(row["id_mle"], abs=0.005)
            assert float(line["redundancy"]) == pytest.approx(row["redundancy"], abs=0.00005)
            assert line["duplicate of"] == (row["duplicate_of"] or "-")
        else:
            assert line["ID (MLE)"] == "-"
            assert line["error"] == row["error"].splitlines()[0]


def test_markdown_lists_gaps(sweep_written):
    text = (sweep_written / report.MARKDOWN_NAME).read_text()
    missing = markdown_section(text, "## What is missing")
    assert "3 cells missing" in missing
    assert "2 cells failed" in missing
    assert "3 cells flagged as duplicates" in missing
    failed = markdown_table(missing[missing.index("### Failed cells"):])
    assert {(line["source"], line["revision"]) for line in failed} == sweeps.FAILED


def test_sweep_html_is_self_contained(sweep_written):
    text = (sweep_written / report.HTML_NAME).read_text()
    images = assert_self_contained(text)
    assert len(images) == 3
    for image in images:
        decode_png(image)
    assert "http://" not in text
    assert "https://" not in text


def test_terminal_table_lists_every_model(sweep_report):
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(pages.rich_table(sweep_report))
    output = console.export_text()
    for model in PYTHIA_MODELS:
        assert model.repo_id in output
    assert "1540 cells (1535 ok, 2 failed, 3 missing)" in output


# ---------------------------------------------------------------- partial and older results


def test_running_sweep_lists_pending_revisions(tmp_path):
    revisions = SCHEDULES["pythia"]
    rows = [row for row in sweeps.pythia_sweep_rows(missing=set(), failed=set(), duplicates={},
                                                      models=PYTHIA_MODELS[:3])
            if row["source"] != "EleutherAI/pythia-70m" or row["step"] < 20_000]
    sweeps.write_results(tmp_path, rows)
    built = report.build_report(tmp_path)

    pending = [revision for name, revision in built.gaps.absent]
    expected = [revision for revision in revisions if int(revision[4:]) >= 20_000]
    assert pending == expected
    assert {name for name, _ in built.gaps.absent} == {"EleutherAI/pythia-70m"}
    by_name = {item.name: item for item in built.series}
    assert not by_name["EleutherAI/pythia-70m"].is_final_complete

    figure = plots.step_figure(built.series)
    absent_points = sum(len(line.get_xdata()) for line in gids(figure.axes[0], "absent:"))
    assert absent_points == len(expected)

    report.write_report(built, tmp_path / "report", ["md"])
    text = (tmp_path / "report" / report.MARKDOWN_NAME).read_text()
    (line,) = markdown_table(text[text.index("### No result yet"):])
    assert line["source"] == "EleutherAI/pythia-70m"
    assert line["revisions"] == str(len(expected))
    assert "cells without a result yet" in text


def test_cell_files_beyond_union_are_read(tmp_path):
    rows = sweeps.pythia_sweep_rows(models=PYTHIA_MODELS[:1], missing=set(), failed=set(), duplicates={})
    sweeps.write_results(tmp_path, rows[:10], cell_files=False)
    sweeps.write_results(tmp_path, rows, union=False)
    results = report.load_results(tmp_path)
    assert len(results.rows) == len(rows)
    assert "154 cell files" in results.read_from


def test_union_rows_without_cell_file_are_kept(tmp_path):
    rows = sweeps.pythia_sweep_rows(models=PYTHIA_MODELS[:1], missing=set(), failed=set(), duplicates={})
    sweeps.write_results(tmp_path, rows, cell_files=False)
    sweeps.write_results(tmp_path, rows[:5], union=False)
    results = report.load_results(tmp_path)
    assert sorted(row["cell_key"] for row in results.rows) == sorted(row["cell_key"] for row in rows)


def test_id_table_file_as_input(tmp_path):
    rows = sweeps.pythia_sweep_rows(models=PYTHIA_MODELS[:2])
    sweeps.write_results(tmp_path, rows, cell_files=False)
    results = report.load_results(tmp_path / "id_table.parquet")
    assert len(results.rows) == 308
    assert results.location == tmp_path


def test_unreadable_cell_file_listed(real_folder, tmp_path):
    folder = tmp_path / "copy"
    (folder / "cells").mkdir(parents=True)
    for path in (real_folder / "cells").iterdir():
        (folder / "cells" / path.name).write_bytes(path.read_bytes())
    (folder / "cells" / "broken.parquet").write_bytes(b"PAR1 truncated")

    built = report.build_report(folder)
    assert len(built.results.rows) == 3
    assert len(built.gaps.unreadable) == 1
    assert "broken.parquet" in built.gaps.unreadable[0]
    assert "1 unreadable cell files skipped." in pages.gap_lines(built)


def test_table_without_newer_columns(tmp_path):
    table = pa.Table.from_pylist(sweeps.pythia_sweep_rows(), schema=store.ID_TABLE_SCHEMA)
    for column in ("duplicate_of", "tokenizer_rows", "malformed_rows"):
        if column in table.column_names:
            table = table.drop_columns([column])
    tmp_path.mkdir(exist_ok=True)
    pq.write_table(table, tmp_path / "id_table.parquet")

    built = report.build_report(tmp_path)
    assert not built.results.duplicate_flags_stored
    flagged = {(row["source"], row["revision"]): row["duplicate_of"] for row in built.gaps.duplicates}
    assert flagged == sweeps.DUPLICATES
    written = report.write_report(built, tmp_path / "report")
    assert {path.name for path in written} >= {plots.STEP_FIGURE, plots.SIZE_FIGURE, report.HTML_NAME}


def test_no_finished_cells(tmp_path):
    rows = sweeps.pythia_sweep_rows(models=PYTHIA_MODELS[:2], failed={
        (model.repo_id, revision) for model in PYTHIA_MODELS[:2] for revision in SCHEDULES["pythia"]})
    sweeps.write_results(tmp_path, rows)
    built = report.build_report(tmp_path)
    written = report.write_report(built, tmp_path / "report")

    assert sorted(path.name for path in written) == [report.HTML_NAME, report.MARKDOWN_NAME]
    text = (tmp_path / "report" / report.MARKDOWN_NAME).read_text()
    assert "308 cells failed" in text
    assert "not drawn" in text
    summary = markdown_table(markdown_section(text, "## Redundancy by source"))
    assert [line["ID (MLE)"] for line in summary] == ["-", "-"]
    assert [line["cells ok"] for line in summary] == ["0/154", "0/154"]
    assert_self_contained((tmp_path / "report" / report.HTML_NAME).read_text())


def test_expected_cells_from_job_file(tmp_path):
    from raysweep import jobs

    job_file = tmp_path / "job.toml"
    job_file.write_text('name = "two-models"\nk = 20\n[[sources]]\n'
                        'sources = ["EleutherAI/pythia-14m", "EleutherAI/pythia-70m"]\n'
                        'revisions = ["step0", "step1000", "step143000"]\n')
    cells = jobs.load_job(str(job_file)).cells
    finished = [cell for cell in cells if cell.source.endswith("14m") and cell.revision != "step1000"]
    rows = []
    for cell in finished:
        row = sweeps.sweep_row(cell.source, cell.revision, 128, 50304, job="two-models")
        row.update(cell_key=cell.cell_key, id_mle=20.0, redundancy=1 - 20 / 128, rows_used=50277)
        rows.append(row)
    sweeps.write_results(tmp_path / "out", rows)

    built = report.build_report(tmp_path / "out", job=str(job_file))
    assert built.job == "two-models"
    assert built.gaps.absent_basis == "job"
    assert sorted(built.gaps.absent) == sorted([
        ("EleutherAI/pythia-14m", "step1000"),
        ("EleutherAI/pythia-70m", "step0"),
        ("EleutherAI/pythia-70m", "step1000"),
        ("EleutherAI/pythia-70m", "step143000"),
    ])
    assert [item.name for item in built.series] == ["EleutherAI/pythia-14m", "EleutherAI/pythia-70m"]
    assert "4 cells of job two-models without a result yet." in pages.gap_lines(built)


def test_shared_label_names_are_distinct(tmp_path):
    rows = []
    for k in (10, 20):
        row = sweeps.sweep_row("random:50x8:0", None, 8, 50, label="noise", k=k)
        row.update(id_mle=5.0 + k / 10, redundancy=0.3)
        rows.append(row)
    names = [item.name for item in report.group_series(rows)]
    assert sorted(names) == ["noise (k=10)", "noise (k=20)"]


# ---------------------------------------------------------------- tiny real runs


def test_real_tokens_ranked_from_parquet(real_folder):
    built = report.build_report(real_folder, token_count=5)
    (cube,) = [extremes for extremes in built.extremes if extremes.lids.series.name == "cube"]
    key = cube.lids.row["cell_key"]
    tokens = pq.read_table(store.tokens_path(real_folder, key)).to_pylist()
    finite = [row for row in tokens if np.isfinite(row["lid"])]
    highest = sorted(finite, key=lambda row: (-row["lid"], row["row"]))[:5]
    lowest = sorted(finite, key=lambda row: (row["lid"], row["row"]))[:5]
    assert [(token.row, token.token, token.lid) for token in cube.highest] == \
        [(row["row"], row["token"], row["lid"]) for row in highest]
    assert [(token.row, token.token, token.lid) for token in cube.lowest] == \
        [(row["row"], row["token"], row["lid"]) for row in lowest]


def test_real_summary_matches_estimates(real_folder):
    built = report.build_report(real_folder)
    assert [item.name for item in built.series] == ["cube", "noise", "plane"]
    by_name = {item.name: item.final_row for item in built.series}
    assert by_name["plane"]["id_mle"] == pytest.approx(2.0, abs=0.4)
    assert by_name["cube"]["id_mle"] == pytest.approx(5.0, abs=1.0)


def test_real_histograms_mark_hidden_size(real_folder):
    built = report.build_report(real_folder)
    figure = plots.histogram_figure(built.token_lids)
    visible = [axis for axis in figure.axes if axis.get_visible()]
    assert len(visible) == 3
    for axis, lids in zip(visible, built.token_lids):
        (line,) = gids(axis, "hidden_size:")
        assert list(line.get_xdata()) == [lids.row["hidden_size"]] * 2
        (estimate_line,) = gids(axis, "id_mle:")
        assert list(estimate_line.get_xdata()) == pytest.approx([lids.row["id_mle"]] * 2)


def test_hidden_size_far_off_scale_is_noted():
    row = sweeps.sweep_row("EleutherAI/pythia-12b", "step143000", 5120, 50688)
    row.update(id_mle=50.0, redundancy=1 - 50 / 5120)
    series = report.group_series([row])[0]
    lids = report.TokenLids(series, row, np.arange(100), np.linspace(20, 80, 100), None)
    figure = plots.histogram_figure([lids])
    (note,) = gids(figure.axes[0], "hidden_size:")
    assert "5120" in note.get_text()
    assert figure.axes[0].get_xlim()[1] < 5120


def test_real_markdown_escapes_tokens(real_folder, tmp_path):
    report.write_report(report.build_report(real_folder, token_count=400), tmp_path, ["md"])
    text = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert "`` pipe\\|tick` ``" in text
    section = markdown_section(text, "## Tokens with the highest and lowest local ID")
    for table_line in section.splitlines():
        if table_line.startswith("| "):
            assert len(re.split(r"(?<!\\)\|", table_line)) == len(pages.TOKEN_HEADERS) + 2


def test_html_escapes_untrusted_text(tmp_path):
    row = sweeps.sweep_row("evil", None, 8, 50, label='<img src="http://127.0.0.1:9/x.png">')
    row.update(status="failed", error='<script src="https://127.0.0.1:9/x.js"></script> boom')
    ok = sweeps.sweep_row("fine", None, 8, 50, label="fine")
    ok.update(id_mle=3.0, redundancy=1 - 3 / 8)
    sweeps.write_results(tmp_path, [row, ok],
                         tokens={ok["cell_key"]: store.tokens_table(ok["cell_key"], [0, 1, 2],
                                                                    ["<b>", "</td>", '"x"'], [1.0, 2.0, 3.0])})
    report.write_report(report.build_report(tmp_path), tmp_path / "report", ["html"])
    text = (tmp_path / "report" / report.HTML_NAME).read_text()
    assert_self_contained(text)
    assert "&lt;script src=&quot;https://127.0.0.1:9/x.js&quot;&gt;" in text
    assert "<code>&lt;/td&gt;</code>" in text


def test_display_token_escapes_and_quotes():
    assert pages.display_token("the") == "the"
    assert pages.display_token("a\nb") == "a\\nb"
    assert pages.display_token(" the") == "' the'"
    assert pages.display_token("") == "''"
    assert pages.display_token(None) == ""


def test_token_extremes_break_ties_by_row():
    row = sweeps.sweep_row("x", None, 4, 6)
    series = report.group_series([row])[0]
    lids = report.TokenLids(series, row, np.array([10, 11, 12, 13, 14, 15]),
                            np.array([2.0, np.inf, 1.0, 2.0, 5.0, np.nan]), None)
    extremes = report.token_extremes(lids, count=3)
    assert [(token.row, token.lid) for token in extremes.highest] == [(14, 5.0), (10, 2.0), (13, 2.0)]
    assert [(token.row, token.lid) for token in extremes.lowest] == [(12, 1.0), (10, 2.0), (13, 2.0)]
    assert extremes.nonfinite == 2


def test_formats_accept_commas_and_reject_unknown():
    assert report.validate_formats(["html,png"]) == ["png", "html"]
    assert report.validate_formats(["md", "MD"]) == ["md"]
    with pytest.raises(report.ReportError, match="pdf is unknown"):
        report.validate_formats(["pdf"])


# ---------------------------------------------------------------- command line


def test_cli_report_writes_default_files(real_folder):
    result = runner.invoke(app, ["report", str(real_folder)])
    assert result.exit_code == 0, result.output
    assert "3 cells (3 ok)" in result.output
    for name in ("plane", "cube", "noise"):
        assert name in result.output
    written = sorted(path.name for path in (real_folder / "report").iterdir())
    assert written == sorted([plots.SIZE_FIGURE, plots.HISTOGRAM_FIGURE, report.MARKDOWN_NAME, report.HTML_NAME])
    images = assert_self_contained((real_folder / "report" / report.HTML_NAME).read_text())
    assert len(images) == 2


def test_cli_report_markdown_only(real_folder, tmp_path):
    result = runner.invoke(app, ["report", str(real_folder), "--format", "md", "--dest", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert [path.name for path in tmp_path.iterdir()] == [report.MARKDOWN_NAME]
    assert "--format png" in (tmp_path / report.MARKDOWN_NAME).read_text()


def test_cli_report_missing_folder(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "does not exist" in " ".join(result.output.split())


def test_cli_report_empty_folder(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "contains no results" in " ".join(result.output.split())


def test_cli_report_unknown_format(real_folder, tmp_path):
    result = runner.invoke(app, ["report", str(real_folder), "-f", "pdf", "--dest", str(tmp_path)])
    assert result.exit_code == 2
    assert "pdf is unknown" in result.output


def test_cli_import_leaves_out_matplotlib():
    code = "import sys; from raysweep.cli import app; print('matplotlib' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.split() == ["False"]


def test_cli_report_does_not_import_torch(real_folder, tmp_path):
    code = ("import sys; from typer.testing import CliRunner; from raysweep.cli import app; "
            f"result = CliRunner().invoke(app, ['report', {str(real_folder)!r}, '--dest', {str(tmp_path)!r}]); "
            "print(result.exit_code, 'torch' in sys.modules, 'ray' in sys.modules)")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.split() == ["0", "False", "False"]


def test_submit_then_report(local_ray, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "plane.npy", (rng.random((300, 2)) @ rng.standard_normal((2, 10))).astype(np.float32))
    job = tmp_path / "job.toml"
    job.write_text(f'name = "tiny"\nk = 10\n[[sources]]\nlabel = "plane"\nsource = "{tmp_path / "plane.npy"}"\n'
                   '[[sources]]\nlabel = "noise"\nsource = "random:300x16:0"\n')
    out = tmp_path / "out"
    submitted = runner.invoke(app, ["submit", str(job), "--out", str(out)])
    assert submitted.exit_code == 0, submitted.output

    result = runner.invoke(app, ["report", str(out), "--job", str(job)])
    assert result.exit_code == 0, result.output
    text = (out / "report" / report.MARKDOWN_NAME).read_text()
    table = {row["label"]: row for row in pq.read_table(out / "id_table.parquet").to_pylist()}
    summary = markdown_table(markdown_section(text, "## Redundancy by source"))
    assert [line["source"] for line in summary] == ["plane", "noise"]
    for line in summary:
        assert float(line["ID (MLE)"]) == pytest.approx(table[line["source"]]["id_mle"], abs=0.005)
    assert "Nothing: every cell is finished." in text
    assert (out / "report" / plots.HISTOGRAM_FIGURE).exists()
