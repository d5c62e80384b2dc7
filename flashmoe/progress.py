"""Progress bars for long work (tools, loading a large checkpoint): tqdm on stderr, or nothing.

    with progress_bar(total=n_bytes, desc="layers", unit="B", enabled=None) as bar: bar.update(k)

`enabled=None` shows the bar only when stderr is a terminal (a notebook's stderr counts: tqdm
renders there too), so logs and pipes stay clean; `enabled=False` (`--quiet`) never shows it.
Without tqdm installed the bar is silently absent.
"""

from __future__ import annotations

import sys


class _NoBar:
    """What progress_bar gives when nothing is shown: the tqdm calls used here, doing nothing."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def write(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *_) -> None:
        pass


def shown(enabled: bool | None = None) -> bool:
    """Whether a bar is drawn: `enabled` if given, else whether stderr is a terminal or a notebook."""
    if enabled is not None:
        return enabled
    stream = sys.stderr
    try:
        if stream is not None and stream.isatty():
            return True
    except (AttributeError, ValueError):
        return False
    return "ipykernel" in sys.modules and _in_notebook()


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress_bar(
    total: float | None = None, desc: str = "", unit: str = "it", enabled: bool | None = None, **kw
):
    """A tqdm bar on stderr (bytes scaled to kB/MB/GB when unit="B"), or a silent stand-in."""
    if not shown(enabled):
        return _NoBar()
    try:
        if _in_notebook():
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
    except ImportError:
        return _NoBar()
    scale = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        **scale,
        **kw,
    )
