"""The shared matplotlib tail (`trl_infalign._plotting.finish_axes`) as both plots use it: a figure the plot created
is saved and closed, one passed in through `ax=` is drawn on and left open."""

import pytest

from trl_infalign import theory
from trl_infalign.diagnose import diagnose

plt = pytest.importorskip("matplotlib.pyplot")


def plots(path):
    rows = [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [1.0, 2.5, 3.0, 5.0, 6.0, 7.0, 8.0, 9.5]]
    result = diagnose(rows, n=2, kl=0.2, methods=["identity", "raw_reward"])
    yield lambda ax=None: result.plot(path, kls=[0.1, 0.2], ax=ax)
    yield lambda ax=None: theory.plot_frontiers("bon", 2, ["identity"], kls=[0.2, 0.4], path=path, ax=ax)


def test_plots_save_and_close_only_their_own_figure(tmp_path):
    for i, plot in enumerate(plots(str(tmp_path / "p.png"))):
        before = set(plt.get_fignums())
        ax = plot()
        assert set(plt.get_fignums()) == before, i  # its own figure: saved and closed
        assert (tmp_path / "p.png").stat().st_size > 1000
        (tmp_path / "p.png").unlink()
        fig, given = plt.subplots()
        assert plot(given) is given and plt.fignum_exists(fig.number), i  # the caller's figure stays open
        assert given.get_legend() is not None and given.xaxis._major_tick_kw.get("gridOn"), i
        assert ax.get_legend() is not None
        plt.close(fig)
