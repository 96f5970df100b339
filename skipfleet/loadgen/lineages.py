"""One validated Lineage per distinct lineage in a load-generator process (a simplification).

Every pointer of a round carries the new version inline with its lineage: the ids of every
device that contributed, so N devices decode N ids each. shared.protocol checks each id with a
regex when it builds the Lineage (`Lineage.__post_init__`): at 1,000 devices that was 40% of
a generator's CPU in a round (in-process measurement, skipfleet/loadgen), and it grows with the
fleet for every device. A real agent decodes one pointer; a generator decodes the same lineage
for each of its hundreds of devices. So, in a generator process only (`lineages_shared()`,
entered by skipfleet.loadgen.process), the codec's `lineage_from_wire` is wrapped: a lineage
equal in every field to one already built and checked in this process is that same (frozen)
Lineage; any other goes through the codec's own reader and checks. Nothing invalid is accepted
(an id is checked the first time it comes in a lineage of that content, and only a lineage that
passed is kept), and the devices share one tuple of ids instead of holding a copy each.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from shared.protocol import codec
from shared.protocol.errors import DecodeError
from shared.protocol.messages import Lineage
from shared.protocol.wire import Fields

KEPT = 8  # distinct lineages kept: a few rounds' versions, per cohort

Reader = Callable[[Fields], Lineage]


class LineageMemo:
    def __init__(self, read: Reader, kept: int = KEPT) -> None:
        self._read = read
        self._kept = kept
        self._built: OrderedDict[tuple[Any, ...], Lineage] = OrderedDict()
        self.hits = 0

    def __call__(self, f: Fields) -> Lineage:
        try:
            parent = f.integer("parent_version", optional=True)
            key = (f.text("round_id"), tuple(f.sequence("device_ids")), f.text("algorithm"),
                   parent, type(parent))  # fmt: skip  # True == 1, but only 1 is valid
            built = self._built.get(key)
        except (DecodeError, TypeError):  # unreadable, or an unhashable id: the codec says why
            return self._read(f)
        if built is not None:
            self.hits += 1
            self._built.move_to_end(key)
            return built
        built = self._read(f)  # raises for an invalid one, which is never kept
        self._built[key] = built
        while len(self._built) > self._kept:
            self._built.popitem(last=False)
        return built


@contextlib.contextmanager
def lineages_shared() -> Iterator[LineageMemo]:
    """While inside: the codec's lineage reader is memoized (see above); restored after."""
    original = codec.lineage_from_wire
    memo = LineageMemo(original)
    codec.lineage_from_wire = memo
    try:
        yield memo
    finally:
        codec.lineage_from_wire = original
