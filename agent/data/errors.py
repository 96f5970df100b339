"""The one exception of the data layer.

Every problem with data (a missing file, a corrupted archive, a wrong shape or dtype, NaN/inf,
labels out of range, a malformed CSV or idx file, an unknown task/group/subject) is raised as a
`DataError` whose message names the file (or the argument) and says what is wrong, so an entry
point can print it and exit instead of showing a NumPy traceback from deep inside a loader.
"""

from __future__ import annotations


class DataError(Exception):
    """A data file or a data selection is unusable; the message says which and why."""
