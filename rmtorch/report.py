"""Report files: metrics.json, per-pair scores.jsonl and PNG figures of an evaluation, training curves, and
RewardBench's table, plot and report files.

Figures are built with matplotlib's object API (`Figure`, rendered by Agg), so nothing touches pyplot's global
state or needs a display. Each PNG is FIGSIZE at DPI: 800 x 500 pixels.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from rmtorch.files import write_json, write_jsonl
from rmtorch.outputs import write_marker
from rmtorch.rewardbench import BENCHMARKS, V1_SECTIONS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_FILES = {
    "metrics": "metrics.json",
    "scores": "scores.jsonl",
    "reward_histograms": "reward_histograms.png",
    "calibration": "calibration.png",
    "accuracy_by_length": "accuracy_by_length.png",
    "accuracy_by_category": "accuracy_by_category.png",
    "length_bias": "length_bias.png",
}
FIGSIZE = (8.0, 5.0)  # inches
DPI = 100
CHOSEN_COLOR, REJECTED_COLOR = "tab:green", "tab:red"
TRAINING_CURVES = ("loss", "accuracy", "margin", "lr")


def new_figure() -> Figure:
    """A FIGSIZE figure. matplotlib is imported here, not with the module: it adds 0.6 s to every process that
    imports train.py, evaluate.py or score.py, and only the ones that write a plot need it."""
    from matplotlib.figure import Figure

    return Figure(figsize=FIGSIZE)


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write `figure` as a PNG of exactly FIGSIZE x DPI pixels (no tight bbox, so the size is fixed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)  # a reader never sees half a PNG
    return path


# -------------------------------------------------------------------------------------- training curves


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Training records (one per optimizer step) and eval records (`eval_*` keys) from a metrics.jsonl.

    The final evaluation lives in eval_results.json next to it (train.py writes it there); when present it is
    the last eval record, at step `train_steps`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist. Pass a training output directory (it holds metrics.jsonl) or the file itself."
        )
    train_records, eval_records = [], []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {line_no}: not valid JSON ({err.msg}); was the file cut off mid-write?"
            ) from None
        (eval_records if any(key.startswith("eval_") for key in record) else train_records).append(record)
    if not train_records:
        raise ValueError(f"{path} has no training steps to plot.")
    final_path = path.parent / "eval_results.json"
    if final_path.is_file():
        final = json.loads(final_path.read_text())
        if "train_steps" in final:
            eval_records.append(
                {
                    "step": final["train_steps"],
                    **{f"eval_{k}": v for k, v in final.items() if isinstance(v, (int, float)) and k != "train_steps"},
                }
            )
    return train_records, eval_records


def plot_training_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Loss, accuracy, margin and learning rate against the optimizer step, with eval points where logged.

    A resumed run appends to metrics.jsonl, so a step can appear twice; the later record wins.
    """
    from matplotlib.ticker import MaxNLocator

    train_records, eval_records = read_metrics(metrics_path)
    by_step = {record["step"]: record for record in train_records}
    steps = sorted(by_step)
    figure = new_figure()
    axes = figure.subplots(2, 2, sharex=True).ravel()
    for ax, key in zip(axes, TRAINING_CURVES):
        ax.plot(
            steps, [by_step[s].get(key, float("nan")) for s in steps], label="train", color="tab:blue", linewidth=1.2
        )
        evals = [(r["step"], r[f"eval_{key}"]) for r in eval_records if f"eval_{key}" in r]
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval", color="tab:orange", markersize=4)
            ax.legend(fontsize=8)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by all four
    for ax in axes[2:]:
        ax.set_xlabel("optimizer step")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].axhline(0.5, color="gray", linestyle=":", linewidth=1)
    axes[3].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    figure.suptitle(f"training curves ({len(steps)} steps)")
    figure.tight_layout()
    return save_figure(figure, out_path)


# --------------------------------------------------------------------------------------- report figures


def plot_reward_histograms(chosen_rewards, rejected_rewards, out_path: str | Path) -> Path:
    """Overlaid histograms of chosen and rejected rewards on shared bins."""
    chosen, rejected = [float(r) for r in chosen_rewards], [float(r) for r in rejected_rewards]
    low, high = min(chosen + rejected), max(chosen + rejected)
    if high == low:
        low, high = low - 0.5, high + 0.5  # all rewards equal: one visible bar instead of zero-width bins
    bins = [low + (high - low) * i / 30 for i in range(31)]
    figure = new_figure()
    ax = figure.subplots()
    ax.hist(chosen, bins=bins, alpha=0.55, color=CHOSEN_COLOR, label=f"chosen (mean {sum(chosen) / len(chosen):.3f})")
    ax.hist(
        rejected,
        bins=bins,
        alpha=0.55,
        color=REJECTED_COLOR,
        label=f"rejected (mean {sum(rejected) / len(rejected):.3f})",
    )
    ax.set_xlabel("reward")
    ax.set_ylabel("pairs")
    ax.set_title(f"reward distributions ({len(chosen)} pairs)")
    ax.legend()
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, out_path)


def plot_calibration(calibration: dict, ece: float, out_path: str | Path) -> Path:
    """Reliability diagram: observed frequency against mean predicted probability per bin, with bin counts."""
    edges = calibration["bin_edges"]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    filled = [i for i, count in enumerate(calibration["count"]) if count]
    figure = new_figure()
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfectly calibrated")
    ax.bar(
        [centers[i] for i in filled],
        [calibration["observed"][i] for i in filled],
        width=edges[1] - edges[0],
        alpha=0.35,
        edgecolor="tab:blue",
        label="observed frequency",
    )
    ax.plot(
        [calibration["mean_predicted"][i] for i in filled],
        [calibration["observed"][i] for i in filled],
        "o-",
        color="tab:blue",
    )
    for i in filled:
        ax.annotate(
            str(calibration["count"][i]),
            (centers[i], calibration["observed"][i]),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=7,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("predicted P(first preferred) = sigmoid(r_first - r_second)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"calibration (ECE {ece:.4f}; each pair counted in both orders)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, out_path)


def plot_accuracy_by(groups: list[dict], title: str, xlabel: str, out_path: str | Path) -> Path:
    """Bar chart of pair accuracy per group (dicts with `name`, `accuracy`, `num_pairs`), chance line at 0.5."""
    figure = new_figure()
    ax = figure.subplots()
    positions = range(len(groups))
    ax.bar(positions, [g["accuracy"] for g in groups], color="tab:blue", alpha=0.7)
    for position, group in zip(positions, groups):
        ax.annotate(
            f"n={group['num_pairs']}",
            (position, group["accuracy"]),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=8,
        )
    ax.axhline(0.5, color="gray", linestyle=":", label="chance")
    ax.set_xticks(list(positions), [g["name"] for g in groups], rotation=20 if len(groups) > 4 else 0, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pair accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return save_figure(figure, out_path)


def plot_length_bias(report: dict, scores: list[dict], out_path: str | Path) -> Path:
    """Left: every response's reward against its length (tokens of the response alone), with the correlations.
    Right: pair accuracy when the chosen response is shorter, as long, or longer than the rejected one."""
    figure = new_figure()
    scatter_ax, order_ax = figure.subplots(1, 2, width_ratios=(3, 2))
    for side, color in (("chosen", CHOSEN_COLOR), ("rejected", REJECTED_COLOR)):
        lengths = [s[f"{side}_response_tokens"] for s in scores]
        scatter_ax.scatter(lengths, [s[f"{side}_reward"] for s in scores], s=8, alpha=0.5, color=color, label=side)
    correlations = {kind: report[f"reward_length_{kind}"] for kind in ("pearson", "spearman")}
    shown = ", ".join(f"{kind} {'n/a' if v is None else f'{v:.3f}'}" for kind, v in correlations.items())
    scatter_ax.set_title(f"reward vs response length ({shown})", fontsize=10)
    scatter_ax.set_xlabel("response tokens (prompt not counted)")
    scatter_ax.set_ylabel("reward")
    scatter_ax.legend(fontsize=8)
    scatter_ax.grid(alpha=0.3)
    groups = report["by_length_order"]
    positions = range(len(groups))
    order_ax.bar(positions, [g["accuracy"] or 0.0 for g in groups], color="tab:blue", alpha=0.7)
    for position, group in zip(positions, groups):
        order_ax.annotate(
            f"n={group['num_pairs']}", (position, group["accuracy"] or 0.0), textcoords="offset points",
            xytext=(0, 3), ha="center", fontsize=8,
        )  # fmt: skip
    order_ax.axhline(0.5, color="gray", linestyle=":")
    order_ax.set_xticks(list(positions), [g["name"] for g in groups], fontsize=8)
    order_ax.set_ylim(0, 1.08)
    order_ax.set_ylabel("pair accuracy")
    order_ax.set_title("accuracy by which response is longer", fontsize=10)
    order_ax.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return save_figure(figure, out_path)


def write_report(report: dict, scores: list[dict], report_dir: str | Path) -> dict[str, Path]:
    """Write metrics.json (the report), scores.jsonl (one line a pair: its row in the data file, rewards, length,
    response tokens, category) and the PNG plots; return their paths. The files are made in a temporary directory
    and moved in when all are complete, so a failure leaves the directory as it was."""
    report_dir = Path(report_dir)
    report_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{report_dir.name}.", dir=report_dir.parent))
    try:
        written = _write_report_files(report, scores, tmp_dir)
        write_marker(tmp_dir, "evaluate")
        if not report_dir.exists():
            os.replace(tmp_dir, report_dir)
        else:  # an earlier report (or a run's report/ with its training curves): replace the report's files only
            for filename in REPORT_FILES.values():
                (report_dir / filename).unlink(missing_ok=True)
            for file in tmp_dir.iterdir():
                os.replace(file, report_dir / file.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {name: report_dir / path.name for name, path in written.items()}


def _write_report_files(report: dict, scores: list[dict], report_dir: Path) -> dict[str, Path]:
    paths = {name: report_dir / filename for name, filename in REPORT_FILES.items()}
    write_json(paths["metrics"], report)
    write_jsonl(paths["scores"], scores)
    chosen, rejected = [s["chosen_reward"] for s in scores], [s["rejected_reward"] for s in scores]
    plot_reward_histograms(chosen, rejected, paths["reward_histograms"])
    plot_calibration(report["calibration"], report["ece"], paths["calibration"])
    length_title, length_axis = (
        "accuracy by pair length (quantile buckets)",
        "tokens in the longer sequence of the pair",
    )
    plot_accuracy_by(report["by_length"], length_title, length_axis, paths["accuracy_by_length"])
    if "by_category" in report:
        plot_accuracy_by(report["by_category"], "accuracy by category", "category", paths["accuracy_by_category"])
    else:
        del paths["accuracy_by_category"]
    if "by_length_order" in report:
        plot_length_bias(report, scores, paths["length_bias"])
    else:
        del paths["length_bias"]
    return paths


# -------------------------------------------------------------------------------------------- RewardBench


def _table_line(label: str, score: float, rows: int | None = None) -> str:
    return f"{label:<32}{'' if rows is None else f'{rows} rows':>10}  {score:.4f}"


def format_benchmark_table(report: dict) -> str:
    """The scores as a terminal table: v1 subsets under their sections, v2 subsets (Ties with its parts), then
    the overall score, and a note when the data is not the whole published benchmark."""
    subsets, rows = report["subsets"], report["subset_rows"]
    lines = [f"{BENCHMARKS[report['benchmark']]}: {report['num_rows']} rows"]
    if "sections" in report:
        for section, score in report["sections"].items():
            lines.append(_table_line(f"  {section}", score))
            lines += [
                _table_line(f"    {name}", subsets[name], rows[name])
                for name in V1_SECTIONS[section]
                if name in subsets
            ]
    else:
        lines += [_table_line(f"  {name}", subsets[name], rows[name]) for name in subsets]
    if "ties" in report:
        lines += [_table_line(f"    {part}", value) for part, value in report["ties"].items() if part != "score"]
    lines.append(_table_line("  overall", report["overall"]))
    if not report["complete"]:
        missing = report["missing_subsets"]
        lines.append(
            "note: not the full benchmark (the subsets hold other row counts than the published data"
            + (f"; no rows of {', '.join(missing)}" if missing else "")
            + "), so the overall score averages only what is here."
        )
    return "\n".join(lines)


def plot_benchmark_scores(report: dict, out_path: str | Path) -> Path:
    """Horizontal bars of every subset's score (v1: coloured by section), beside the sections and overall."""
    figure = new_figure()
    subsets_ax, summary_ax = figure.subplots(1, 2, width_ratios=(3, 1))
    names = list(report["subsets"])
    colors = ["C0"] * len(names)
    if "sections" in report:  # a subset takes its section's colour
        sections = list(report["sections"])
        section_of = {name: section for section, members in V1_SECTIONS.items() for name in members}
        colors = [f"C{sections.index(section_of[name])}" for name in names]
    subsets_ax.barh(range(len(names)), list(report["subsets"].values()), color=colors)
    subsets_ax.set_yticks(range(len(names)), names, fontsize=7)
    subsets_ax.invert_yaxis()
    subsets_ax.set_xlim(0, 1)
    subsets_ax.set_xlabel("score")
    subsets_ax.grid(alpha=0.3, axis="x")
    summary = {**report.get("sections", {}), "overall": report["overall"]}
    summary_colors = [f"C{i}" for i in range(len(summary) - 1)] + ["tab:gray"]  # sections as their subsets
    summary_ax.bar(range(len(summary)), list(summary.values()), color=summary_colors)
    summary_ax.set_xticks(range(len(summary)), list(summary), rotation=45, ha="right", fontsize=8)
    summary_ax.set_ylim(0, 1)
    summary_ax.grid(alpha=0.3, axis="y")
    figure.suptitle(f"{BENCHMARKS[report['benchmark']]}: overall {report['overall']:.4f} ({report['num_rows']} rows)")
    figure.tight_layout()
    return save_figure(figure, out_path)


def write_benchmark_report(report: dict, lines: list[dict], report_dir: str | Path) -> dict[str, Path]:
    """Write BENCHMARK.json (the report), BENCHMARK_scores.jsonl (a line per row) and BENCHMARK.png under
    `report_dir`, each whole or not at all, and mark the directory as an evaluation report; return the paths."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    name = report["benchmark"]
    paths = {
        "report": report_dir / f"{name}.json",
        "scores": report_dir / f"{name}_scores.jsonl",
        "plot": report_dir / f"{name}.png",
    }
    write_json(paths["report"], report)
    write_jsonl(paths["scores"], lines)
    plot_benchmark_scores(report, paths["plot"])
    write_marker(report_dir, "evaluate")  # --report may name this directory again
    return paths
