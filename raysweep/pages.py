"""Render a report as Markdown, as one self-contained HTML page, and as a terminal table.

All three show the same formatted values, built once by `summary_rows`,
`cell_rows` and `token_rows`. The HTML page embeds its figures as base64
data URIs and its style inline, and a Content-Security-Policy forbids any
other source, so it opens without network access and loads nothing.
"""

from __future__ import annotations

import base64
import html as html_module
import math
import re

from rich.table import Table

from raysweep import __version__
from raysweep.plots import HISTOGRAM_FIGURE, LORA_FIGURE, SIZE_FIGURE, STEP_FIGURE
from raysweep.report import Report, Series, TokenExtremes, format_k

SUMMARY_HEADERS = ("source", "matrix", "revision", "hidden size", "parameters", "rows used", "k", "ID (MLE)",
                   "mean LID", "median LID", "redundancy", "cells ok", "not shown")
CELL_HEADERS = ("source", "revision", "step", "status", "ID (MLE)", "redundancy", "rows used", "hidden size",
                "duplicate of", "error")
TOKEN_HEADERS = ("rank", "highest LID", "token", "row", "lowest LID", "token", "row")
LORA_HEADERS = ("sweep", "LoRA rank", "status", "perplexity", "unmodified", "before training", "train loss",
                "steps", "seconds", "error")
LORA_TITLE = "Perplexity against LoRA rank"
LORA_EXPLANATION = (
    "Each row is one LoRA rank trained on the input embedding, with every other weight frozen. "
    "\"unmodified\" is the checkpoint's own perplexity. \"before training\" is the perplexity of the model "
    "that the LoRA delta starts from, which is the checkpoint itself in adapt mode and the checkpoint with "
    "its initial input embedding in reconstruct mode."
)
ERROR_WIDTH = 160

FIGURES = (
    (SIZE_FIGURE, "ID and redundancy against model size",
     "needs finished cells of at least two sources"),
    (STEP_FIGURE, "ID and redundancy against training step",
     "needs a source with cells at several training steps"),
    (HISTOGRAM_FIGURE, "Per-token LID histograms",
     "needs per-token files (tokens/KEY.parquet) of finished cells"),
)

CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 80rem; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; }
th { background: #f2f2f2; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f5f5f5; padding: 0 0.2rem; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; }
.gaps li { margin: 0.2rem 0; }
"""
NUMERIC_HEADERS = {"hidden size", "parameters", "rows used", "k", "ID (MLE)", "mean LID", "median LID",
                   "redundancy", "cells ok", "step", "rank", "highest LID", "lowest LID", "row", "LoRA rank",
                   "perplexity", "unmodified", "before training", "train loss", "steps", "seconds"}


def summary_rows(report: Report) -> list[tuple[str, ...]]:
    """Return one formatted row per series: its final cell's values and what is not shown."""
    rows = []
    for item in report.series:
        final = item.final_row or {}
        rows.append((
            item.name,
            item.matrix,
            _text(final.get("revision")) if final else "-",
            _integer(final.get("hidden_size") if final else item.hidden_size),
            _parameters(item.parameters),
            _integer(final.get("rows_used")),
            format_k(item.k, item.k_min),
            _number(final.get("id_mle"), 2),
            _number(final.get("id_mean"), 2),
            _number(final.get("id_median"), 2),
            _number(final.get("redundancy"), 4),
            f"{item.count('ok')}/{item.revision_count}",
            _not_shown(item),
        ))
    return rows


def cell_rows(report: Report) -> list[tuple[str, ...]]:
    """Return one formatted row per cell, series by series in training order."""
    rows = []
    for item in report.series:
        for row in item.rows:
            rows.append((
                item.name,
                _text(row["revision"]),
                _integer(row["step"]),
                row["status"],
                _number(row["id_mle"], 2),
                _number(row["redundancy"], 4),
                _integer(row["rows_used"]),
                _integer(row["hidden_size"]),
                _text(row.get("duplicate_of")),
                _first_line(row["error"]),
            ))
    return rows


def token_rows(extremes: TokenExtremes) -> list[tuple[str, ...]]:
    """Return the top and bottom token lists of one series side by side, rank by rank."""
    rows = []
    for rank in range(max(len(extremes.highest), len(extremes.lowest))):
        cells = [str(rank + 1)]
        for ranked in (extremes.highest, extremes.lowest):
            if rank < len(ranked):
                token = ranked[rank]
                cells += [_number(token.lid, 2), display_token(token.token), str(token.row)]
            else:
                cells += ["", "", ""]
        rows.append(tuple(cells))
    return rows


def gap_lines(report: Report) -> list[str]:
    """Return one sentence per kind of gap: what the report cannot show and why."""
    gaps = report.gaps
    lines = []
    if gaps.failed:
        lines.append(f"{_cells(len(gaps.failed))} failed. The report lists their errors.")
    if gaps.missing:
        lines.append(f"{_cells(len(gaps.missing))} missing: the revision or file does not exist at the source.")
    if gaps.duplicates:
        lines.append(f"{_cells(len(gaps.duplicates))} flagged as duplicates: the embedding equals an earlier "
                     "revision's, so these are marked on the training curves but not used as values.")
    if gaps.absent:
        if gaps.absent_basis == "job":
            lines.append(f"{_cells(len(gaps.absent))} of job {report.job} without a result yet.")
        else:
            lines.append(f"{_cells(len(gaps.absent))} without a result yet: revisions that other sources "
                         "of the same job have.")
    if gaps.without_tokens:
        lines.append(f"No per-token file, so no histogram or token list, for: {', '.join(gaps.without_tokens)}.")
    if gaps.unreadable:
        lines.append(f"{len(gaps.unreadable)} unreadable cell files skipped.")
    for status in ("failed", "missing"):
        count = sum(curve.count(status) for curve in report.lora)
        if count:
            lines.append(f"{count} LoRA {'rank' if count == 1 else 'ranks'} {status}. The LoRA table lists "
                         "their errors.")
    return lines


def lora_rows(report: Report) -> list[tuple[str, ...]]:
    """Return one formatted row per LoRA rank, curve by curve in rank order."""
    rows = []
    for curve in report.lora:
        for row in curve.rows:
            rows.append((
                curve.name,
                str(row["rank"]),
                row["status"],
                _number(row["perplexity"], 3),
                _number(row["baseline_perplexity"], 3),
                _number(row["start_perplexity"], 3),
                _number(row["train_loss"], 4),
                _integer(row["steps"]),
                _number(row["seconds"], 1),
                _first_line(row["error"]),
            ))
    return rows


def lora_id_lines(report: Report) -> list[str]:
    """Return one sentence per LoRA curve: the ID marked for its model, or why none is."""
    source = f"the ID table {report.id_table}" if report.id_table else "the ID table of this folder"
    lines = []
    for curve in report.lora:
        row = curve.id_row
        if row is None or row.get("id_mle") is None:
            lines.append(f"{curve.name}: {source} has no finished input-embedding row for {curve.model}, "
                         "so no ID is marked.")
            continue
        k = format_k(row.get("k"), row.get("k_min"))
        revision = f" at revision {row['revision']}" if row.get("revision") else ""
        lines.append(f"{curve.name}: measured ID (MLE) {row['id_mle']:.2f} with k={k}{revision}, "
                     f"hidden size {_integer(row.get('hidden_size'))}.")
    return lines


def lora_rich_table(report: Report) -> Table:
    """Return the LoRA ranks for the terminal."""
    table = Table(title=LORA_TITLE)
    for header in LORA_HEADERS:
        numeric = header in NUMERIC_HEADERS
        table.add_column(header, justify="right" if numeric else "left", no_wrap=numeric, overflow="fold")
    for row in lora_rows(report):
        table.add_row(*row)
    return table


def _markdown_lora(report: Report, linked_figures: list[str]) -> list[str]:
    lines = [f"## {LORA_TITLE}", "", LORA_EXPLANATION, ""]
    lines += [f"- {_markdown_escape(sentence)}" for sentence in lora_id_lines(report)]
    lines.append("")
    if LORA_FIGURE in linked_figures:
        lines += [f"![{LORA_TITLE}]({LORA_FIGURE})", ""]
    lines += _markdown_table(LORA_HEADERS, lora_rows(report))
    return lines


def _html_lora(report: Report) -> list[str]:
    parts = [f'<section id="lora"><h2>{_escape(LORA_TITLE)}</h2>', f"<p>{_escape(LORA_EXPLANATION)}</p>"]
    parts.append('<ul class="gaps">' + "".join(f"<li>{_escape(line)}</li>" for line in lora_id_lines(report))
                 + "</ul>")
    image = (report.figures or {}).get(LORA_FIGURE)
    if image is not None:
        data = base64.b64encode(image).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_escape(LORA_TITLE)}">'
                     f"<figcaption>{_escape(LORA_TITLE)} ({_escape(LORA_FIGURE)})</figcaption></figure>")
    parts.append(_html_table(LORA_HEADERS, lora_rows(report)))
    parts.append("</section>")
    return parts


def _cells(count: int) -> str:
    return "1 cell" if count == 1 else f"{count} cells"


def absent_by_series(report: Report) -> list[tuple[str, str, str]]:
    """Return (series, count, revisions) for the series with absent revisions, revisions abbreviated."""
    rows = []
    for item in report.series:
        if item.absent:
            rows.append((item.name, str(len(item.absent)), _abbreviate([_text(name or None) for name in item.absent])))
    return rows


def display_token(token: str | None) -> str:
    """Show a token with control characters escaped, and quoted when it has outer whitespace."""
    if token is None:
        return ""
    escaped = repr(token)
    return escaped if token != token.strip() or not token else escaped[1:-1]


def rich_table(report: Report) -> Table:
    """Return the redundancy table for the terminal."""
    counts = report.status_counts
    title = f"{report.results.location}: {_status_summary(counts)}"
    table = Table(title=title)
    for header in SUMMARY_HEADERS:
        numeric = header in NUMERIC_HEADERS
        table.add_column(header, justify="right" if numeric else "left", no_wrap=numeric, overflow="fold")
    for row in summary_rows(report):
        table.add_row(*row)
    return table


def markdown(report: Report, linked_figures: list[str]) -> str:
    """Render the report as Markdown; `linked_figures` are PNG files written beside it."""
    lines = [f"# {_title(report)}", "", _header_sentence(report), ""]
    lines += ["## Redundancy by source", "",
              "Values of each source's final revision: the finished, non-duplicate cell with the highest "
              "training step. Redundancy = 1 - ID / hidden size.", ""]
    lines += _markdown_table(SUMMARY_HEADERS, summary_rows(report))

    lines += ["## What is missing", ""]
    gap_sentences = gap_lines(report)
    lines += [f"- {sentence}" for sentence in gap_sentences] if gap_sentences else ["Nothing: every cell is finished."]
    lines.append("")
    for title, headers, rows in gap_tables(report):
        lines += [f"### {title}", ""]
        lines += _markdown_table(headers, rows)

    lines += ["## Plots", ""]
    for name, title, reason in FIGURES:
        if report.figures is None:
            lines += [f"- {title}: written with `--format png` or `--format html`.", ""]
        elif name not in report.figures:
            lines += [f"- {title}: not drawn; it {reason}.", ""]
        elif name in linked_figures:
            lines += [f"![{title}]({name})", ""]
        else:
            lines += [f"- {title}: written only with `--format png` or in the HTML page.", ""]

    lines += ["## Tokens with the highest and lowest local ID", ""]
    if not report.extremes:
        lines += ["No per-token LIDs were found.", ""]
    for extremes in report.extremes:
        lines += [f"### {_token_heading(extremes)}", ""]
        lines += _markdown_table(TOKEN_HEADERS, token_rows(extremes), code_columns={2, 5})

    lines += ["## All cells", ""]
    lines += _markdown_table(CELL_HEADERS, cell_rows(report))
    if report.lora:
        lines += _markdown_lora(report, linked_figures)
    return "\n".join(lines)


def html(report: Report) -> str:
    """Render the report as one HTML page with its figures embedded and no external reference."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
        f"<title>{_escape(_title(report))}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{_escape(_title(report))}</h1>",
        f"<p>{_escape(_header_sentence(report))}</p>",
        '<section id="summary"><h2>Redundancy by source</h2>',
        "<p>Values of each source's final revision: the finished, non-duplicate cell with the highest "
        "training step. Redundancy = 1 - ID / hidden size.</p>",
        _html_table(SUMMARY_HEADERS, summary_rows(report)),
        "</section>",
        '<section id="missing"><h2>What is missing</h2>',
        _html_gaps(report),
        "</section>",
        '<section id="plots"><h2>Plots</h2>',
        *_html_figures(report),
        "</section>",
        '<section id="tokens"><h2>Tokens with the highest and lowest local ID</h2>',
        *_html_tokens(report),
        "</section>",
        f'<section id="cells"><details><summary>All cells ({len(report.results.rows)})</summary>',
        _html_table(CELL_HEADERS, cell_rows(report)),
        "</details></section>",
        *(_html_lora(report) if report.lora else []),
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _title(report: Report) -> str:
    name = report.job or report.results.location.name or str(report.results.location)
    return f"raysweep report: {name}"


def _header_sentence(report: Report) -> str:
    return (f"Read from {report.results.read_from}: {_status_summary(report.status_counts)}. "
            f"Written by raysweep {__version__}.")


def _status_summary(counts) -> str:
    total = sum(counts.values())
    details = ", ".join(f"{counts[status]} {status}" for status in ("ok", "failed", "missing") if counts[status])
    return f"{total} cells ({details})" if details else f"{total} cells"


def _not_shown(item: Series) -> str:
    parts = []
    for status in ("failed", "missing"):
        if item.count(status):
            parts.append(f"{item.count(status)} {status}")
    if item.duplicate_rows:
        parts.append(f"{len(item.duplicate_rows)} duplicate")
    if item.absent:
        parts.append(f"{len(item.absent)} pending")
    return ", ".join(parts)


def _token_heading(extremes: TokenExtremes) -> str:
    lids = extremes.lids
    revision = lids.row["revision"]
    heading = lids.series.name if revision is None else f"{lids.series.name} @ {revision}"
    notes = [f"{len(lids.lids)} tokens"]
    if extremes.nonfinite:
        notes.append(f"{extremes.nonfinite} with infinite LID (all k neighbours equidistant) left out")
    if lids.tokens is None:
        notes.append("no vocabulary, so matrix rows only")
    if not lids.is_final:
        notes.append("latest revision with per-token LIDs, not the final one")
    return f"{heading} ({'; '.join(notes)})"


def gap_tables(report: Report) -> list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]]:
    """Return (title, headers, rows) of each non-empty list of cells that the report cannot show."""
    gaps = report.gaps
    tables = [
        ("Failed cells", ("source", "revision", "error"),
         [(row["label"], _text(row["revision"]), _first_line(row["error"])) for row in gaps.failed]),
        ("Missing cells", ("source", "revision", "error"),
         [(row["label"], _text(row["revision"]), _first_line(row["error"])) for row in gaps.missing]),
        ("Duplicate revisions", ("source", "revision", "duplicate of"),
         [(row["label"], _text(row["revision"]), _text(row.get("duplicate_of"))) for row in gaps.duplicates]),
        ("No result yet", ("source", "revisions", "which"), absent_by_series(report)),
        ("Unreadable cell files", ("file and error",), [(entry,) for entry in gaps.unreadable]),
    ]
    return [table for table in tables if table[2]]


def _markdown_table(headers, rows, code_columns: set[int] = frozenset()) -> list[str]:
    if not rows:
        return ["(none)", ""]
    align = ["---:" if header in NUMERIC_HEADERS else "---" for header in headers]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    for row in rows:
        cells = [_markdown_code(value) if index in code_columns and value else _markdown_escape(value)
                 for index, value in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _markdown_escape(text: str) -> str:
    """Escape what would end a table cell or start Markdown or HTML markup."""
    text = " ".join(str(text).split())
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def _markdown_code(text: str) -> str:
    """Wrap text in a code span whose fence is longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    padded = f" {text} " if text.startswith("`") or text.endswith("`") else text
    # GitHub tables end a cell at "|" even inside a code span.
    return f"{fence}{padded}{fence}".replace("|", "\\|")


def _html_table(headers, rows, code_columns: set[int] = frozenset()) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{_escape(header)}</th>" for header in headers)
    body = []
    for row in rows:
        cells = []
        for index, (header, value) in enumerate(zip(headers, row)):
            css = ' class="number"' if header in NUMERIC_HEADERS else ""
            content = f"<code>{_escape(value)}</code>" if index in code_columns and value else _escape(value)
            cells.append(f"<td{css}>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_gaps(report: Report) -> str:
    sentences = gap_lines(report)
    if not sentences:
        return "<p>Nothing: every cell is finished.</p>"
    parts = ['<ul class="gaps">' + "".join(f"<li>{_escape(sentence)}</li>" for sentence in sentences) + "</ul>"]
    for title, headers, rows in gap_tables(report):
        parts.append(f"<h3>{_escape(title)}</h3>{_html_table(headers, rows)}")
    return "\n".join(parts)


def _html_figures(report: Report) -> list[str]:
    parts = []
    for name, title, reason in FIGURES:
        image = (report.figures or {}).get(name)
        if image is None:
            parts.append(f"<p>{_escape(title)}: not drawn; it {_escape(reason)}.</p>")
            continue
        data = base64.b64encode(image).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_escape(title)}">'
                     f"<figcaption>{_escape(title)} ({_escape(name)})</figcaption></figure>")
    return parts


def _html_tokens(report: Report) -> list[str]:
    if not report.extremes:
        return ["<p>No per-token LIDs were found.</p>"]
    parts = []
    for extremes in report.extremes:
        parts.append(f"<h3>{_escape(_token_heading(extremes))}</h3>")
        parts.append(_html_table(TOKEN_HEADERS, token_rows(extremes), code_columns={2, 5}))
    return parts


def _escape(text) -> str:
    return html_module.escape(str(text), quote=True)


def _text(value) -> str:
    return "-" if value is None or value == "" else str(value)


def _integer(value) -> str:
    return "-" if value is None else str(int(value))


def _number(value, digits: int) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def _parameters(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def _first_line(error: str | None) -> str:
    if not error:
        return ""
    line = error.strip().splitlines()[0]
    return line if len(line) <= ERROR_WIDTH else line[: ERROR_WIDTH - 3] + "..."


def _abbreviate(names: list[str], keep: int = 4) -> str:
    """Join revision names, keeping the first and last few of a long list."""
    if len(names) <= 2 * keep:
        return ", ".join(names)
    return f"{', '.join(names[:keep])}, ... ({len(names) - 2 * keep} more), {', '.join(names[-keep:])}"
