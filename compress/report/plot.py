"""Size-vs-quality scatter (PNG bytes): every evaluated artifact, the Pareto front, the pick.

matplotlib is imported here only, and lazily, so reading or printing a report stays light.
The Figure API (no pyplot) keeps no global state and always renders with Agg.
"""
from __future__ import annotations

import io


def size_quality_png(points: list[dict], *, title: str, max_size_mb=None, max_kld=None) -> bytes:
    """points: [{label, size_mb, kld, pareto, recommended, group}]; returns a PNG image.

    Only points with both size and KLD are drawn. `group` (a run name in compare) picks the colour.
    """
    from matplotlib.figure import Figure

    pts = [p for p in points if p.get("size_mb") is not None and p.get("kld") is not None]
    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(_plain(title), fontsize=10)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("KLD vs teacher (nats/token, lower is better)")
    ax.grid(True, alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, "no evaluated artifacts yet", ha="center", va="center", transform=ax.transAxes)
        return _png(fig)

    groups = list(dict.fromkeys(p.get("group") for p in pts))
    colors = [f"C{i % 10}" for i in range(len(groups))]
    for g, color in zip(groups, colors):
        gp = [p for p in pts if p.get("group") == g]
        ax.scatter([p["size_mb"] for p in gp], [p["kld"] for p in gp], color=color, s=36, zorder=3,
                   label=_plain(g) if g else None)
        # Pareto front of this group: a step line through the non-dominated points, small to large.
        front = sorted((p for p in gp if p.get("pareto")), key=lambda p: p["size_mb"])
        if len(front) > 1:
            ax.step([p["size_mb"] for p in front], [p["kld"] for p in front], where="post",
                    color=color, alpha=0.6, linewidth=1.5, zorder=2,
                    label=f"{_plain(g)} Pareto front" if g else "Pareto front")
    for p in pts:
        ax.annotate(_plain(p["label"]), (p["size_mb"], p["kld"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
        if p.get("recommended"):
            ax.scatter([p["size_mb"]], [p["kld"]], s=220, facecolors="none", edgecolors="crimson",
                       linewidths=2, zorder=4, label="recommended")
    if max_size_mb is not None:
        ax.axvline(max_size_mb, color="grey", linestyle="--", linewidth=1, label=f"max size {max_size_mb:g} MB")
    if max_kld is not None:
        ax.axhline(max_kld, color="grey", linestyle=":", linewidth=1, label=f"max KLD {max_kld:g}")
    sizes = [p["size_mb"] for p in pts]
    if min(sizes) > 0 and max(sizes) / min(sizes) > 8:   # quants span orders of magnitude
        ax.set_xscale("log")
    handles, labels = ax.get_legend_handles_labels()
    if labels:
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def _plain(text) -> str:
    # A name holding two '$' would otherwise be parsed as mathtext (and may fail to render).
    return str(text).replace("$", r"\$")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
