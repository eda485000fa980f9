"""chart.png: for each service, sockproto's ratio to each peer in each case."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from bench.report import MAIN_METRIC, SERVICE_TITLES
from bench.stats import OURS, Figure, figure_table, ratio


def ratios_by_service(figures: Sequence[Figure]) -> dict[str, tuple[list[str], dict[str, list[float]]]]:
    """service -> (cases, peer -> ratio per case; NaN where there is none)."""
    out: dict[str, tuple[list[str], dict[str, list[float]]]] = {}
    for (service, metric), cases in figure_table(figures).items():
        if MAIN_METRIC.get(service) != metric:
            continue
        case_names = [
            case
            for case, by_server in cases.items()
            if OURS in by_server and by_server[OURS].summary() is not None
        ]
        peers: dict[str, list[float]] = {}
        for index, case in enumerate(case_names):
            by_server = cases[case]
            ours = by_server[OURS].summary()
            for server, figure in by_server.items():
                if server == OURS:
                    continue
                value = ratio(ours, figure.summary(), figure.better)
                peers.setdefault(server, [float("nan")] * len(case_names))[index] = (
                    value if value is not None else float("nan")
                )
        if case_names and peers:
            out[service] = (case_names, peers)
    return out


def render_chart(figures: Sequence[Figure], path: Path, title: str) -> bool:
    """Writes the PNG; False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    data = ratios_by_service(figures)
    if not data:
        return False
    missing = [s for s in dict.fromkeys(f.service for f in figures) if s not in data]
    fig, axes = plt.subplots(
        len(data), 1, figsize=(11, 0.8 + 3.2 * len(data)), squeeze=False, layout="constrained"
    )
    for ax, (service, (cases, peers)) in zip(axes[:, 0], data.items(), strict=True):
        width = 0.8 / max(1, len(peers))
        finite = [v for values in peers.values() for v in values if math.isfinite(v)]
        low, high = min([0.5, *finite]) / 1.5, max([2.0, *finite]) * 1.5
        for offset, (peer, values) in enumerate(peers.items()):
            # NaN: no figure for this case; infinite: the peer stalled (bar to the top).
            shown = [(i, v) for i, v in enumerate(values) if not math.isnan(v)]
            if not shown:
                continue
            xs = [i + (offset - (len(peers) - 1) / 2) * width for i, _ in shown]
            heights = [high / 1.2 if math.isinf(v) else v for _, v in shown]
            bars = ax.bar(xs, heights, width, label=f"vs {peer}", color=f"C{offset}")
            labels = ["stalled" if math.isinf(v) else f"{v:.2f}" for _, v in shown]
            ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if low <= t <= high]
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(-0.5, len(cases) - 0.5)
        ax.set_xticks(range(len(cases)), cases, fontsize=8)
        ax.set_ylabel("x better than the peer")
        ax.set_title(f"{SERVICE_TITLES.get(service, service)}: {MAIN_METRIC[service]}", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        ax.grid(axis="y", which="major", alpha=0.3)
    if missing:
        title += f"\nnot measured for sockproto in this run: {', '.join(missing)}"
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
