"""One row of `skipfleet bench faults`, and the printed table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Row:
    """What a scenario measured. None: the figure does not apply to the scenario (printed -)."""

    scenario: str
    injected: str
    reports_lost: int | None = None
    applied_twice: int | None = None
    honest_harmed: int | None = None
    recover_s: float | None = None  # from the fault until the fleet was whole again
    held: bool = False  # the target for this scenario was met
    comparison: bool = False  # not a default: shown beside the targets, held to none
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


COLUMNS = ("scenario", "injected", "lost", "twice", "harmed", "recover s", "target")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def render(rows: list[Row]) -> str:
    cells = [
        (
            r.scenario,
            r.injected,
            _cell(r.reports_lost),
            _cell(r.applied_twice),
            _cell(r.honest_harmed),
            _cell(r.recover_s),
            "(comparison)" if r.comparison else "met" if r.held else "NOT MET",
        )
        for r in rows
    ]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)
