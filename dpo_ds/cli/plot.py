"""Training curves of one or more runs, from their metrics.jsonl, as one PNG.

    python -m dpo_ds.plot runs/dpo                       # -> runs/dpo/curves.png
    python -m dpo_ds.plot runs/dpo_b01 runs/dpo_b05 --out compare.png

The x axis is examples seen (`counters/examples`), so runs with different batch sizes line up.
Train records are thin lines, eval records markers joined by a line; one colour per run. Panels with
no data are left out: an SFT run has loss and log-probs, a DPO run also has the reward panels.
matplotlib is imported only when plotting, so `import dpo_ds.cli.plot` costs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from dpo_ds.run.dir import RunDir
from dpo_ds.training import metrics as metric_names

X_KEY = metric_names.EXAMPLES
SPLITS = ("train", "eval")
# (title, y label, [(metric group, field, line style)]); a key is f"{group}_{split}/{field}",
# except loss, which the trainer names f"loss/{split}".
PANELS = [
    ("loss", "loss", [("loss", "", "-")]),
    ("reward accuracy", "fraction of pairs with r(chosen) > r(rejected)", [("rewards", "accuracies", "-")]),
    ("reward margin", "r(chosen) - r(rejected)", [("rewards", "margins", "-")]),
    ("rewards", "beta * log(pi / pi_ref)", [("rewards", "chosen", "-"), ("rewards", "rejected", "--")]),
    ("policy log-probs", "sum of log p(response)", [("logps", "chosen", "-"), ("logps", "rejected", "--")]),
    (
        "shift from the reference",
        "per token: (log pi - log pi_ref) / |y|",
        [("logps", "chosen_shift_per_token", "-"), ("logps", "rejected_shift_per_token", "--")],
    ),
    ("checker score", "eval.checker's mean score of greedy generations", [("eval", "checker_score", "-")]),
]


PLOT_EXTRA = "pip install 'dpo_ds[plot]'"  # the extra that brings matplotlib (setup.py extras_require)


class PlotError(ValueError):
    """A run directory whose metrics cannot be plotted (the message names the directory, file and line),
    or matplotlib missing (the message names the extra that installs it)."""


def metric_key(group: str, field: str, split: str) -> str:
    if group == "eval":  # eval-only metrics, named eval/<field> (the checker score)
        return metric_names.eval_only(field) if split == "eval" else ""
    return metric_names.key(group, split, field)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl, in file order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise PlotError(f"run directory {run_dir} {what} (expected a run_dir that training wrote)")
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise PlotError(
            f"{run_dir} holds no metrics ({path} does not exist): expected the run_dir of a run that "
            "has logged at least one step"
        )
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                break  # a run still writing: its last line may be cut short
            raise PlotError(f"{path} line {i}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise PlotError(f"{path} line {i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise PlotError(f"{path} is empty: the run has not logged a step yet")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(x, y) for one metric, sorted by examples seen. A resumed run repeats some x values in the
    file; the later record wins, so the curve is the one the resumed run actually followed."""
    points: dict[float, float] = {}
    for r in rows:
        x, y = r.get(X_KEY), r.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            points[float(x)] = float(y)
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def pyplot():
    """matplotlib.pyplot on the file-only backend, or PlotError naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError(f"matplotlib is not installed; plotting needs it: {PLOT_EXTRA}") from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    runs = [(Path(d), read_metrics(Path(d))) for d in run_dirs]  # bad run dirs first: no import for them
    plt = pyplot()
    names = [d.resolve().name or str(d) for d, _ in runs]
    if len(set(names)) < len(names):  # two runs called e.g. "LATEST"/"dpo": fall back to the path given
        names = [str(d) for d, _ in runs]

    # which panels have any data in any run
    panels = []
    for title, ylabel, lines in PANELS:
        keys = {metric_key(g, f, s) for g, f, _ in lines for s in SPLITS}
        if any(series(rows, k)[0] for _, rows in runs for k in keys):
            panels.append((title, ylabel, lines))
    if not panels:
        wanted = sorted({metric_key(g, f, s) for _, _, ls in PANELS for g, f, _ in ls for s in SPLITS})
        raise PlotError(
            f"no plottable metrics in {', '.join(str(RunDir(d).metrics) for d, _ in runs)}: "
            f"expected '{X_KEY}' and some of {wanted}"
        )

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, lines) in zip(axes.flat, panels):
        drawn = set()  # line styles drawn, to say in the title what dashed means only when it appears
        for r, ((_, rows), name) in enumerate(zip(runs, names)):
            color = colors[r % len(colors)]
            for group, field, style in lines:
                label_field = f" {field}" if len(lines) > 1 else ""
                xs, ys = series(rows, metric_key(group, field, "train"))
                if xs:
                    drawn.add(style)
                    ax.plot(xs, ys, style, color=color, lw=0.8, alpha=0.6, label=f"{name} train{label_field}")
                xs, ys = series(rows, metric_key(group, field, "eval"))
                if xs:
                    drawn.add(style)
                    ax.plot(
                        xs,
                        ys,
                        style,
                        color=color,
                        lw=1.6,
                        marker="o",
                        ms=4,
                        label=f"{name} eval{label_field}",
                    )
        if title == "reward accuracy":
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        if title == "checker score":
            ax.set_ylim(-0.02, 1.02)
        if title == "reward margin":
            ax.axhline(0.0, color="grey", lw=0.6, ls=":")
        ax.set_title(title + (" (solid chosen, dashed rejected)" if len(drawn) > 1 else ""))
        ax.set_xlabel("examples seen")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None, prog: str | None = None) -> int:
    # usage names the command as it was run: dpo-ds-plot or python -m (`dpo-ds plot` passes prog)
    launched = Path(sys.argv[0]).name
    prog = prog or (launched if launched and not launched.endswith(".py") else "python -m dpo_ds.plot")
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories holding metrics.jsonl"
    )
    ap.add_argument("--out", type=Path, default=None, help="PNG to write (default: FIRST_RUN_DIR/curves.png)")
    args = ap.parse_args(argv)
    out = args.out if args.out is not None else args.run_dirs[0] / "curves.png"
    try:
        written = plot_runs(args.run_dirs, out)
    except PlotError as e:
        print(f"dpo_ds.plot: error: {e}", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
