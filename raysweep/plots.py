"""PNG figures of a report: ID against model size, ID against training step, LID histograms, LoRA ranks.

The figures are built on `matplotlib.figure.Figure` without pyplot, so they
render through the Agg backend with no display and no global figure registry.
Each plotted artist carries a gid ("series:NAME", "duplicate:NAME", ...), so
tests and scripts can find what was drawn for which series.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from raysweep.lora_report import LoraCurve
from raysweep.report import Report, Series, TokenLids, format_k
from raysweep.schedules import step_of

SIZE_FIGURE = "id_vs_size.png"
STEP_FIGURE = "id_vs_step.png"
HISTOGRAM_FIGURE = "lid_histograms.png"
LORA_FIGURE = "lora_perplexity_vs_rank.png"

DPI = 110
HISTOGRAM_BINS = 60
# The histogram's x axis ends just above this quantile of the finite LIDs, so
# that a few extreme tokens do not squeeze the bulk into one bin. The panel
# states how many tokens lie beyond the axis.
HISTOGRAM_QUANTILE = 0.999
# The hidden size gets a line when it is within this factor of the axis end,
# else an off-scale note (Pythia-12b's 5120 against LIDs near 100).
HIDDEN_SIZE_REACH = 3.0

# Markers for revisions without a value on a training curve, and for duplicates.
GAP_STYLES = {
    "duplicate": dict(marker="x", markersize=7, markeredgewidth=1.6, label="duplicate revision (same embedding)"),
    "missing": dict(marker="o", markersize=7, markerfacecolor="none", markeredgecolor="tab:red",
                    markeredgewidth=1.4, label="missing (not found at the source)"),
    "failed": dict(marker="X", markersize=7, color="tab:red", label="failed"),
    "absent": dict(marker="o", markersize=6, markerfacecolor="none", markeredgecolor="0.55",
                   markeredgewidth=1.2, label="no result yet"),
}
STEP_TICKS = (0, 1, 10, 100, 1_000, 10_000, 100_000)


def render_figures(report: Report) -> dict[str, bytes]:
    """Render every figure that the report has data for; return PNG bytes by file name."""
    builders = (
        (SIZE_FIGURE, lambda: size_figure(report.series)),
        (STEP_FIGURE, lambda: step_figure(report.series)),
        (HISTOGRAM_FIGURE, lambda: histogram_figure(report.token_lids)),
        (LORA_FIGURE, lambda: lora_figure(report.lora)),
    )
    figures = {}
    for name, build in builders:
        figure = build()
        if figure is not None:
            figures[name] = png_bytes(figure)
    return figures


def png_bytes(figure: Figure) -> bytes:
    """Render a figure as PNG, without the "Software" text chunk that names matplotlib's URL."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def size_figure(series: tuple[Series, ...] | list[Series]) -> Figure | None:
    """Plot each series' final ID and redundancy against its size; None with fewer than two points.

    Models of a known family are joined by one line per family and setting,
    on a log axis of parameter counts. Other sources, whose parameter count is
    unknown, are single markers on a log axis of hidden size. A hollow marker
    is a model whose last revision has no result yet, so its latest finished
    step is plotted.
    """
    points = [item for item in series if item.final_row is not None]
    if len(points) < 2:
        return None
    families: dict[tuple, list[Series]] = {}
    for item in points:
        if item.model is not None:
            key = (item.family, item.matrix, format_k(item.k, item.k_min), item.duplicate_policy)
            families.setdefault(key, []).append(item)
    others = [item for item in points if item.model is None]

    rows = [kind for kind, present in (("parameters", families), ("hidden size", others)) if present]
    figure = Figure(figsize=(11, 4.2 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), 2, squeeze=False)
    for row_axes, kind in zip(axes, rows):
        for axis, column, title in zip(row_axes, ("id_mle", "redundancy"), ("ID (MLE)", "redundancy")):
            if kind == "parameters":
                _plot_families(axis, families, column)
            else:
                _plot_single_sources(axis, others, column)
            _set_size_axis(axis)
            axis.set_xlabel("parameters" if kind == "parameters" else "hidden size")
            axis.set_ylabel(title)
            axis.set_title(f"{title} against {'parameter count' if kind == 'parameters' else 'hidden size'}")
            axis.grid(True, which="both", alpha=0.3)
        row_axes[0].legend(fontsize="small")
    return figure


def step_figure(series: tuple[Series, ...] | list[Series]) -> Figure | None:
    """Plot ID and redundancy against training step, one line per series that spans several steps.

    Returns None when no such series has a finished, non-duplicate cell.

    The step axis is symmetric-log, linear below 1, so step 0 is visible.
    Duplicate revisions are crosses at their (copied) value, off the line.
    Missing, failed and not yet computed revisions are markers placed on the
    line where their step falls.
    """
    sweeps = [item for item in series if item.is_sweep and item.curve_rows]
    if not sweeps:
        return None
    colours = _colours(sweeps)
    figure = Figure(figsize=(11, 8), layout="constrained")
    id_axis, redundancy_axis = figure.subplots(2, 1, sharex=True)

    kinds_drawn: set[str] = set()
    for item in sweeps:
        for axis, column in ((id_axis, "id_mle"), (redundancy_axis, "redundancy")):
            kinds_drawn |= _plot_training_curve(axis, item, column, colours[item.name])

    for axis, title in ((id_axis, "ID (MLE)"), (redundancy_axis, "redundancy = 1 - ID / hidden size")):
        axis.set_ylabel(title)
        axis.grid(True, which="major", alpha=0.3)
        _set_step_axis(axis)
    id_axis.set_title("ID against training step")
    redundancy_axis.set_xlabel("training step (symmetric log scale; linear below 1)")

    handles = [Line2D([], [], color=colours[item.name], label=_short_names(sweeps)[item.name]) for item in sweeps]
    for kind in ("duplicate", "missing", "failed", "absent"):
        if kind in kinds_drawn:
            handles.append(Line2D([], [], linestyle="none", **{"color": "0.2", **GAP_STYLES[kind]}))
    id_axis.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   ncols=2 if len(handles) > 16 else 1)
    return figure


def histogram_figure(token_lids: tuple[TokenLids, ...] | list[TokenLids]) -> Figure | None:
    """Plot one histogram of per-token LIDs per series, with its ID and hidden size marked."""
    if not token_lids:
        return None
    columns = min(3, len(token_lids))
    rows = math.ceil(len(token_lids) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, lids in zip(axes, token_lids):
        _plot_histogram(axis, lids)
    for axis in axes[len(token_lids):]:
        axis.set_visible(False)
    figure.suptitle("Per-token local ID")
    return figure


def _plot_families(axis, families: dict[tuple, list[Series]], column: str) -> None:
    for (family, matrix, k, _), members in families.items():
        members = sorted(members, key=lambda item: item.parameters)
        x = [item.parameters for item in members]
        y = [item.final_row[column] for item in members]
        label = f"{family} ({matrix}, k={k})"
        (line,) = axis.plot(x, y, "-", gid=f"series:{label}", label=label)
        complete = [item.is_final_complete for item in members]
        axis.plot([v for v, keep in zip(x, complete) if keep], [v for v, keep in zip(y, complete) if keep],
                  "o", color=line.get_color(), gid=f"points:{label}")
        partial = [not keep for keep in complete]
        if any(partial):
            axis.plot([v for v, keep in zip(x, partial) if keep], [v for v, keep in zip(y, partial) if keep],
                      "o", markerfacecolor="white", color=line.get_color(), gid=f"partial:{label}",
                      label="last revision without a valid result: latest one plotted")
        for name, xv, yv in zip(_without_common_prefix([item.model.repo_id for item in members]), x, y):
            axis.annotate(name, (xv, yv), textcoords="offset points", xytext=(3, 4), fontsize=7)


def _plot_single_sources(axis, others: list[Series], column: str) -> None:
    names = _short_names(others)
    for item in others:
        x = item.final_row["hidden_size"]
        y = item.final_row[column]
        axis.plot([x], [y], "o", gid=f"series:{item.name}", label=names[item.name])
        axis.annotate(names[item.name], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _plot_training_curve(axis, item: Series, column: str, colour) -> set[str]:
    """Draw one series on one axis; return the gap kinds that got markers."""
    curve = item.curve_rows
    x = np.array([row["step"] for row in curve], dtype=float)
    y = np.array([row[column] for row in curve], dtype=float)
    axis.plot(x, y, "-", marker=".", markersize=3, linewidth=1.2, color=colour, gid=f"series:{item.name}")

    gaps = {
        "duplicate": [(row["step"], row[column]) for row in item.duplicate_rows if row["step"] is not None],
        "missing": [(row["step"], None) for row in item.rows if row["status"] == "missing"],
        "failed": [(row["step"], None) for row in item.rows if row["status"] == "failed"],
        "absent": [(step_of(revision), None) for revision in item.absent],
    }
    drawn = set()
    for kind, points in gaps.items():
        points = [(step, value) for step, value in points if step is not None]
        if kind != "duplicate":
            # Revisions without a value sit on the line; a series without
            # finished points has no line to place them on.
            points = [(step, np.interp(step, x, y)) for step, _ in points] if len(x) else []
        if not points:
            continue
        style = dict(GAP_STYLES[kind])
        style.pop("label")
        if kind == "duplicate":
            style["color"] = colour
        axis.plot([step for step, _ in points], [value for _, value in points], linestyle="none",
                  gid=f"{kind}:{item.name}", zorder=3, **style)
        drawn.add(kind)
    return drawn


def _plot_histogram(axis, lids: TokenLids) -> None:
    name = lids.series.name
    finite = lids.finite_lids
    id_mle = lids.row["id_mle"]
    hidden_size = lids.row["hidden_size"]
    title = name if lids.row["revision"] is None else f"{name} @ {lids.row['revision']}"
    if not lids.is_final:
        title += " (latest with per-token LIDs)"
    axis.set_title(title, fontsize="medium")
    if len(finite) == 0:
        axis.text(0.5, 0.5, "no finite LIDs", transform=axis.transAxes, ha="center")
        return

    reference = max(float(np.quantile(finite, HISTOGRAM_QUANTILE)), id_mle or 0.0)
    upper = reference * 1.1
    hidden_on_scale = hidden_size is not None and hidden_size <= HIDDEN_SIZE_REACH * upper
    if hidden_on_scale:
        upper = max(upper, hidden_size * 1.05)
    in_range = finite[finite <= upper]
    axis.hist(in_range, bins=np.linspace(0.0, upper, HISTOGRAM_BINS + 1), color="tab:blue", alpha=0.8,
              gid=f"histogram:{name}")

    if id_mle is not None:
        axis.axvline(id_mle, color="tab:red", linewidth=1.5, gid=f"id_mle:{name}", label=f"ID (MLE) {id_mle:.1f}")
    if hidden_on_scale:
        axis.axvline(hidden_size, color="black", linestyle="--", linewidth=1.2, gid=f"hidden_size:{name}",
                     label=f"hidden size {hidden_size}")
    elif hidden_size is not None:
        axis.text(0.98, 0.55, f"hidden size {hidden_size} \u2192\n(off scale)", transform=axis.transAxes,
                  ha="right", fontsize="small", gid=f"hidden_size:{name}")

    notes = [f"{len(lids.lids)} tokens"]
    if len(in_range) < len(finite):
        notes.append(f"{len(finite) - len(in_range)} above {upper:.0f}")
    if len(finite) < len(lids.lids):
        notes.append(f"{len(lids.lids) - len(finite)} infinite")
    axis.text(0.98, 0.97, "\n".join(notes), transform=axis.transAxes, ha="right", va="top", fontsize="small")
    axis.set_xlim(0.0, upper)
    axis.set_xlabel("local ID")
    axis.set_ylabel("tokens")
    axis.legend(fontsize="x-small", loc="center right")


def _set_size_axis(axis) -> None:
    """Log axis with ticks at 1, 2 and 5 per decade when the data span two decades or less."""
    axis.set_xscale("log")
    axis.margins(x=0.15, y=0.1)
    low, high = axis.dataLim.intervalx
    narrow = low > 0 and math.log10(high / low) <= 2
    axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if narrow else (1.0,)))
    axis.xaxis.set_major_formatter(FuncFormatter(_compact_number))
    axis.xaxis.set_minor_locator(LogLocator(base=10, subs="auto"))


def _set_step_axis(axis) -> None:
    axis.set_xscale("symlog", linthresh=1.0, linscale=0.5)
    axis.xaxis.set_major_locator(FixedLocator(STEP_TICKS))
    axis.xaxis.set_major_formatter(FuncFormatter(_compact_number))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xlim(left=-0.3)


def _compact_number(value: float, _position=None) -> str:
    """Format an axis value as 50, 2k, 70M or 12B."""
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _colours(series: list[Series]) -> dict[str, tuple]:
    """Colour models of known size by log parameter count (viridis); others by matplotlib's cycle."""
    from matplotlib import colormaps

    sizes = [math.log10(item.parameters) for item in series if item.parameters]
    low, high = (min(sizes), max(sizes)) if sizes else (0.0, 1.0)
    cycle = colormaps["tab10"]
    colours, other = {}, 0
    for item in series:
        if item.parameters:
            position = 0.0 if high == low else (math.log10(item.parameters) - low) / (high - low)
            colours[item.name] = colormaps["viridis"](0.9 * position)
        else:
            colours[item.name] = cycle(other % 10)
            other += 1
    return colours


def _without_common_prefix(names: list[str]) -> list[str]:
    """Shorten "EleutherAI/pythia-14m", "EleutherAI/pythia-70m" to "14m", "70m" (cut at a "-" or "/")."""
    if len(names) < 2:
        return [name.rsplit("/", 1)[-1] for name in names]
    prefix = os.path.commonprefix(names)
    cut = max(prefix.rfind("-"), prefix.rfind("/")) + 1
    return [name[cut:] for name in names]


def _short_names(series: list[Series]) -> dict[str, str]:
    """Keep the part after the last "/" ("EleutherAI/pythia-70m" to "pythia-70m") where that stays unique."""
    short = {item.name: item.name.rsplit("/", 1)[-1] for item in series}
    if len(set(short.values())) < len(short):
        return {item.name: item.name for item in series}
    return short


def lora_figure(curves: tuple[LoraCurve, ...] | list[LoraCurve]) -> Figure | None:
    """Plot perplexity against LoRA rank, one panel per model and revision; None without a finished rank.

    Both axes are logarithmic. Each mode and setting is one line (reconstruct
    solid, adapt dashed). Dotted horizontal lines mark the unmodified model's
    perplexity and, for reconstruct, the perplexity with the initial embedding
    before training. A vertical line marks the model's measured ID (MLE) when
    the ID table has it. Failed and missing ranks are red crosses on the line.
    """
    drawn = [curve for curve in curves if curve.ok_rows]
    if not drawn:
        return None
    panels: dict[tuple, list[LoraCurve]] = {}
    for curve in drawn:
        panels.setdefault((curve.model, curve.revision), []).append(curve)

    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6.4 * columns, 4.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, members in zip(axes, panels.values()):
        _plot_lora_panel(axis, members)
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    figure.suptitle("Perplexity against LoRA rank on the input embedding")
    return figure


def _plot_lora_panel(axis, curves: list[LoraCurve]) -> None:
    from matplotlib import colormaps

    cycle = colormaps["tab10"]
    ranks = sorted({row["rank"] for curve in curves for row in curve.rows})
    for index, curve in enumerate(curves):
        colour = cycle(index % 10)
        finished = curve.ok_rows
        x = np.array([row["rank"] for row in finished], dtype=float)
        y = np.array([row["perplexity"] for row in finished], dtype=float)
        style = "-" if curve.mode == "reconstruct" else "--"
        axis.plot(x, y, style, marker="o", markersize=4, color=colour, gid=f"lora:{curve.name}",
                  label=curve.name)
        if curve.mode == "reconstruct" and curve.start_perplexity is not None:
            axis.axhline(curve.start_perplexity, color=colour, linestyle=":", linewidth=1.0,
                         gid=f"lora-start:{curve.name}", label="initial embedding, before training")
        failed = [row["rank"] for row in curve.rows if row["status"] != "ok"]
        if failed and len(x):
            values = np.exp(np.interp(np.log(failed), np.log(x), np.log(y)))
            axis.plot(failed, values, linestyle="none", gid=f"lora-failed:{curve.name}", zorder=3,
                      **{key: value for key, value in GAP_STYLES["failed"].items() if key != "label"},
                      label="failed or missing rank")

    baselines = sorted({round(curve.baseline_perplexity, 6) for curve in curves
                        if curve.baseline_perplexity is not None})
    for value in baselines:
        axis.axhline(value, color="black", linestyle=":", linewidth=1.2, gid="lora-baseline",
                     label=f"unmodified model {value:.4g}")
    _mark_lora_id(axis, curves[0], ranks)

    label = curves[0].rows[0]["label"] or curves[0].model
    revision = curves[0].revision
    axis.set_title(label if revision is None else f"{label} @ {revision}", fontsize="medium")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _position=None: f"{value:g}"))
    axis.yaxis.set_minor_formatter(NullFormatter())
    axis.xaxis.set_major_locator(FixedLocator(ranks))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _position=None: f"{value:g}"))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xlabel("LoRA rank (log scale)")
    axis.set_ylabel("perplexity (log scale)")
    axis.grid(True, which="both", alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axis.legend(unique.values(), unique.keys(), fontsize="x-small")


def _mark_lora_id(axis, curve: LoraCurve, ranks: list[int]) -> None:
    """Draw the measured ID as a vertical line, or note it beside the axis when it lies far outside the ranks."""
    row = curve.id_row
    if row is None or row.get("id_mle") is None:
        return
    value = float(row["id_mle"])
    where = "" if row.get("revision") in (None, curve.revision) else f" at {row['revision']}"
    label = f"measured ID (MLE) {value:.1f}{where}, k={format_k(row.get('k'), row.get('k_min'))}"
    if min(ranks) / 4 <= value <= max(ranks) * 4:
        axis.axvline(value, color="tab:red", linewidth=1.5, gid=f"lora-id:{curve.model}", label=label)
    else:
        axis.text(0.98, 0.02, label + " (off scale)", transform=axis.transAxes, ha="right", va="bottom",
                  fontsize="small", color="tab:red", gid=f"lora-id:{curve.model}")
