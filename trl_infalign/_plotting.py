"""The matplotlib head and tail shared by the package's plots (`DiagnosisResult.plot`, `theory.plot_frontiers`,
`EvaluationResult.plot`).

Imports only matplotlib, lazily: any part of the package may use it.
"""

from __future__ import annotations


def pyplot(what: str, headless: bool):
    """`matplotlib.pyplot`, switched to the file-only Agg backend when the plot is only saved (`headless`: no `ax`
    given, a `path` given); an ImportError naming `what` and the extra to install when matplotlib is missing."""
    try:
        import matplotlib

        if headless:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(f"{what} needs matplotlib: pip install 'trl-infalign[plot]'") from error
    return plt


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
