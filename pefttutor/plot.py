"""The plotting helpers the chapters share.

Defined in the chapter "Full fine-tuning" (book/full_finetuning.ipynb).
"""
from __future__ import annotations

import matplotlib.pyplot as plt

# A figure 7 inches wide is shown at the book's column width (about 730 px), so one point of
# font is about 1.4 px there: 11-point text reads at about 15 px.
STYLE = {"figure.figsize": (7, 3.6), "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
         "legend.fontsize": 10, "xtick.labelsize": 10, "ytick.labelsize": 10,
         "figure.dpi": 110, "axes.spines.top": False, "axes.spines.right": False}


# One colour per method, the same in every chapter's figure (baselines in greys).
METHOD_COLORS = {"head": "#9e9e9e", "full": "#424242", "lora": "#1f77b4", "krona": "#ff7f0e",
                 "fedpara": "#2ca02c", "qlora": "#d62728", "houlsby": "#9467bd", "pfeiffer": "#8c564b",
                 "parallel": "#e377c2", "fusion": "#17becf", "adapterdrop": "#bcbd22",
                 "prompt": "#fd8d3c", "ptuning": "#74c476", "prefix": "#6baed6", "ptuning-v2": "#9e9ac8",
                 "mpt": "#a6761d"}
_SPARE = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94"]


def method_colors(methods) -> dict:
    """A colour for each method name: its own from :data:`METHOD_COLORS`, else a spare one."""
    spare = iter(_SPARE * (1 + len(methods) // len(_SPARE)))
    return {m: METHOD_COLORS.get(m) or next(spare) for m in methods}


def style() -> None:
    """Make figures legible at the book's page width (call once, at the top of a chapter)."""
    plt.rcParams.update(STYLE)


def comparison(tab: dict, methods=None, tasks=None, ax=None, title: str | None = None):
    """Grouped bars: one group per task, one bar per method, the height the mean test score over
    seeds and the whisker one standard deviation (``tab`` from :func:`pefttutor.bench.table`)."""
    methods = methods or list(dict.fromkeys(m for m, _ in tab))
    tasks = tasks or list(dict.fromkeys(t for _, t in tab))
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(methods)
    colors = method_colors(methods)
    for i, name in enumerate(methods):
        xs = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(tasks))]
        cells = [tab.get((name, task)) for task in tasks]
        ax.bar([x for x, c in zip(xs, cells) if c], [c["mean"] for c in cells if c], width,
               yerr=[c["std"] for c in cells if c], capsize=2, label=name, color=colors[name])
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(ylabel="test score (mean of seeds)", ylim=(0, 1.05), title=title)
    ax.legend(ncol=min(len(methods), 6), loc="upper center", bbox_to_anchor=(0.5, -0.12),
              frameon=False)
    return ax.figure
