"""The one progress bar of long runs (batches, sweeps): tqdm's, which picks a widget in Jupyter, text on a
terminal, and nothing when output is not a terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm


def progress_bar(total: int, desc: str, *, initial: int = 0, enabled: bool = True) -> tqdm[None]:
    """A bar counting requests; ``enabled=False`` gives a bar that shows nothing (same methods, no checks)."""
    from tqdm.auto import tqdm  # on demand: finding out whether this is Jupyter imports IPython

    return tqdm(total=total, initial=initial, desc=desc, unit="req", disable=None if enabled else True,
                dynamic_ncols=True)
