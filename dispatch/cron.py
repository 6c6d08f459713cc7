"""A schedule's timing: a cron expression read in an IANA time zone, as the instants it fires.

croniter reads the expression (5 fields, an optional 6th for seconds, or an alias such as
`@hourly`) and walks the wall clock; this module maps wall times to instants, deciding what the
clock changes of daylight saving time do:

- a wall time the clock skips (spring forward) does not fire;
- a wall time the clock passes twice (fall back) fires once, at its first pass; except that an
  expression whose hour field is `*` (it runs every hour) runs in the repeated hour again, as in
  any other hour, since every hour of its day has its fires.

Everything here is pure: the scheduler passes the database's clock in.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from itertools import groupby
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

from dispatch.errors import InvalidInput

ALIASES = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                     "@hourly"})
# croniter's hashed (H) and random (R) values would let replicas disagree on the fire times.
_UNSTABLE = re.compile(r"(^|[,/])[HR](\(|$|[,/])", re.IGNORECASE)
# A forward walk over the fires missed while no scheduler ran stops after this many (about half
# a second); beyond it the newest fires are found walking back from now.
SCAN_CAP = 20_000
# How late a fire may be made under catch_up 'none': a scheduler wakes within milliseconds of a
# fire, and another replica takes over from a killed one within about a second.
ON_TIME = timedelta(seconds=30)


@dataclass(frozen=True)
class Due:
    """What a scheduler does for one schedule now: the fires to make (oldest first), how many due
    fires the catch-up rule leaves out, and the next fire after now (None: never again)."""

    fires: list[datetime]
    missed: int
    next_fire_at: datetime | None


class Cron:
    """A validated expression in a zone; InvalidInput (field cron or timezone) otherwise."""

    def __init__(self, expression: str, timezone: str = "UTC") -> None:
        self.expression = expression.strip()
        self.zone = zone(timezone)
        expr = self.expression
        if expr.startswith("@"):
            if expr.lower() not in ALIASES:
                raise InvalidInput(
                    f"cron alias {expr[:32]!r} is not one of {', '.join(sorted(ALIASES))}",
                    field="cron",
                )
        else:
            fields = expr.split()
            if len(fields) not in (5, 6):
                raise InvalidInput(
                    "cron must have 5 fields (minute hour day month weekday), 6 with seconds"
                    f" last, or be an alias such as @hourly; got {len(fields)}", field="cron")
            if any(_UNSTABLE.search(f) for f in fields):
                raise InvalidInput("cron: hashed (H) and random (R) values are not supported",
                                   field="cron")
        try:
            probe = croniter(expr, datetime(2000, 1, 1))
            self._every_hour = probe.expanded[1] == ["*"]
        except (CroniterBadCronError, ValueError, KeyError) as exc:
            raise InvalidInput(f"cron {expr[:64]!r} is not a valid expression: {exc}",
                               field="cron") from None
        if self.next_after(datetime(2000, 1, 1, tzinfo=UTC)) is None:
            raise InvalidInput(f"cron {expr[:64]!r} never fires", field="cron")

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire strictly after `after`; None when there is none."""
        return next(self.fires_after(after), None)

    def fires_after(self, after: datetime) -> Iterator[datetime]:
        """The fires strictly after `after`, in order, as UTC instants."""
        start = _wall(after, self.zone)
        if _kind(start, self.zone) != "plain":  # inside a clock change: begin before it
            start -= timedelta(hours=3)
        for instant in self._instants(start):
            if instant > after:
                yield instant

    def due(self, next_fire_at: datetime, now: datetime, catch_up: str, limit: int) -> Due:
        """The fires due by `now` from `next_fire_at` (itself a fire) on, chosen by the catch-up
        rule: `all` makes the newest `limit`, `latest` the newest one, `none` the newest one only
        when it is on time (at most ON_TIME late: no scheduler was down over it)."""
        due: deque[datetime] = deque(maxlen=limit if catch_up == "all" else 1)
        count = 0
        later = None
        if next_fire_at <= now:
            due.append(next_fire_at)
            count = 1
        for fire in self.fires_after(next_fire_at):
            if fire > now:
                later = fire
                break
            due.append(fire)
            count += 1
            if count >= SCAN_CAP:
                due = deque(self._newest(now, due.maxlen or 1), maxlen=due.maxlen)
                count = max(count, len(due))
                later = self.next_after(now)
                break
        fires = list(due)
        if catch_up == "none" and fires and now - fires[-1] > ON_TIME:
            fires = []
        return Due(fires=fires, missed=count - len(fires), next_fire_at=later)

    def _newest(self, now: datetime, n: int) -> list[datetime]:
        """The newest n fires at or before now, walking the wall clock back."""
        it = croniter(self.expression, _wall(now, self.zone) + timedelta(seconds=1))
        found: list[datetime] = []
        for wall in _walls(it.get_prev):
            if len(found) >= n:
                break
            found.extend(self._passes(wall))
        return sorted(f for f in found if f <= now)[-n:]

    def _instants(self, start: datetime) -> Iterator[datetime]:
        """The fires after the wall time `start`, in order. A run of wall times in a repeated
        hour is read whole: its first pass, then (every-hour expressions) its second."""
        runs = groupby(_walls(croniter(self.expression, start).get_next),
                       key=lambda wall: _kind(wall, self.zone) == "fold")
        for repeated, walls in runs:
            if not repeated:
                for wall in walls:
                    yield from self._passes(wall)
                continue
            run = list(walls)
            yield from (_instant(w, self.zone, fold=0) for w in run)
            if self._every_hour:
                yield from (_instant(w, self.zone, fold=1) for w in run)

    def _passes(self, wall: datetime) -> list[datetime]:
        """The instants the wall time fires at: none when the clock skips it, its first pass,
        and its second too in a repeated hour for an every-hour expression."""
        kind = _kind(wall, self.zone)
        if kind == "gap":
            return []
        first = [_instant(wall, self.zone, fold=0)]
        if kind == "fold" and self._every_hour:
            return [*first, _instant(wall, self.zone, fold=1)]
        return first


def _walls(step: Callable[[type[datetime]], datetime]) -> Iterator[datetime]:
    """The wall times croniter's get_next or get_prev gives, until it finds no more."""
    while True:
        try:
            yield step(datetime)
        except CroniterBadDateError:
            return


def zone(name: str) -> tzinfo:
    """The IANA time zone `name`; InvalidInput (field timezone) when there is none."""
    if not 1 <= len(name) <= 64 or name.startswith(("/", ".")) or ".." in name:
        raise InvalidInput(f"timezone {name[:64]!r} is not an IANA time zone", field="timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(
            f"timezone {name[:64]!r} is not an IANA time zone (such as UTC or Europe/Berlin)",
            field="timezone",
        ) from None


def _wall(instant: datetime, tz: tzinfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None)


def _instant(wall: datetime, tz: tzinfo, *, fold: int) -> datetime:
    return wall.replace(tzinfo=tz, fold=fold).astimezone(UTC)


def _kind(wall: datetime, tz: tzinfo) -> str:
    """'gap' (the clock skips this wall time), 'fold' (it passes it twice) or 'plain'."""
    first = wall.replace(tzinfo=tz, fold=0)
    if first.utcoffset() == wall.replace(tzinfo=tz, fold=1).utcoffset():
        return "plain"
    # A wall time the clock skips does not come back from the instant its first reading names.
    return "fold" if _wall(first.astimezone(UTC), tz) == wall else "gap"
