"""The matplotlib tail shared by the package's plots (`DiagnosisResult.plot`, `theory.plot_frontiers`).

Imports only matplotlib, lazily through the caller's `fig`: any part of the package may use it.
"""

from __future__ import annotations


def finish_axes(fig, ax, path: str | None, own_figure: bool):
    """Grid and legend on `ax`; with `path`, lay out and save the figure (130 dpi) and close it when the caller
    created it (`own_figure`; a figure passed in through `ax=` stays open). Returns `ax`."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=130)
        if own_figure:
            import matplotlib.pyplot as plt

            plt.close(fig)
    return ax
