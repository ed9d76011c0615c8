"""Which restore points to keep: pure retention evaluation.

No I/O and no clock. :func:`evaluate` takes the restore points of ONE retention group (one policy, one VM)
and a :class:`RetentionPolicy`, and returns a :class:`Decision` for every point, newest first, each naming the
rule that keeps it or why it goes. The semantics are defined in ``docs/retention.md``; in short:

1. ``protected`` points are kept and never count (they neither use up a rule's budget nor cover a period).
2. Points whose status is not ``"success"`` never count and are removed, except the newest one if it is
   newer than every successful point (kept for diagnosis; it may be a run still being written).
3. The count rules run in the fixed order keep-last, keep-hourly, keep-daily, keep-weekly (ISO weeks),
   keep-monthly, keep-yearly. Each walks the successful, unprotected points newest to oldest; a period
   whose newest point is already kept (by an earlier rule, or earlier in this rule) is covered and costs
   nothing; otherwise the point, which is its period's newest, is kept while the rule has budget; the first
   new period without budget ends the rule. (An older point kept by keep-weekly does not cover its month:
   ISO weeks straddle months and years.) Periods are computed in the policy's IANA time zone from the
   points' instants. So raising a count, or adding an older point, never removes a point that was kept.
4. keep-within keeps every successful point strictly newer than (newest successful point - duration);
   it is measured from the newest success, not from now, and does not change what the count rules keep.
5. The newest successful point is always kept.
6. A policy without any rule is refused (:class:`RetentionError`).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Final, Generic, Protocol, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from reconciler.rules.durations import format_duration

__all__ = [
    "RULE_ORDER",
    "CalendarDuration",
    "Decision",
    "RestorePointInfo",
    "RestorePointLike",
    "RetentionError",
    "RetentionPolicy",
    "evaluate",
    "parse_duration",
]

UTC: Final = timezone.utc


class RetentionError(ValueError):
    """An invalid retention policy, duration or input."""


# --------------------------------------------------------------------------------------------------
# Durations for keep-within
# --------------------------------------------------------------------------------------------------

_UNITS: Final = {"y": "years", "m": "months", "w": "weeks", "d": "days", "h": "hours"}
_UNIT_HELP: Final = "h (hours), d (days), w (weeks), m (months), y (years)"
_TOKEN = re.compile(r"([0-9]+)([A-Za-z]*)")


@dataclass(frozen=True, slots=True)
class CalendarDuration:
    """A calendar duration for keep-within, e.g. ``1y6m``.

    Years, months, weeks and days are calendar arithmetic on the wall clock in the policy's time zone
    (one month before 31 March is 28/29 February); hours are elapsed time.
    """

    years: int = 0
    months: int = 0
    weeks: int = 0
    days: int = 0
    hours: int = 0

    def __post_init__(self) -> None:
        values = (self.years, self.months, self.weeks, self.days, self.hours)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise RetentionError(
                "duration parts must be non-negative whole numbers, got"
                f" {self.years}y{self.months}m{self.weeks}w{self.days}d{self.hours}h"
            )
        if not any(values):
            raise RetentionError("duration must be longer than zero")

    def __str__(self) -> str:
        parts = (
            (self.years, "y"),
            (self.months, "m"),
            (self.weeks, "w"),
            (self.days, "d"),
            (self.hours, "h"),
        )
        return "".join(f"{value}{unit}" for value, unit in parts if value)

    def before(self, instant: datetime, zone: ZoneInfo) -> datetime:
        """``instant`` minus this duration (calendar parts in ``zone``), in UTC. Clamps to the year 1."""
        local = instant.astimezone(zone)
        month_index = local.year * 12 + (local.month - 1) - self.years * 12 - self.months
        year, month = divmod(month_index, 12)
        month += 1
        if year < 1:
            return datetime.min.replace(tzinfo=UTC)
        day = min(local.day, calendar.monthrange(year, month)[1])
        try:
            shifted = local.replace(tzinfo=None, year=year, month=month, day=day) - timedelta(
                weeks=self.weeks, days=self.days
            )
            return shifted.replace(tzinfo=zone, fold=0).astimezone(UTC) - timedelta(hours=self.hours)
        except (OverflowError, ValueError):
            return datetime.min.replace(tzinfo=UTC)


def parse_duration(text: str) -> CalendarDuration:
    """Parse a keep-within duration: one or more ``<number><unit>`` parts, units ``h d w m y``.

    ``"30d"``, ``"2w"``, ``"6m"`` (calendar months), ``"1y"``, ``"1y6m"``, ``"36h"``. Raises
    :class:`RetentionError` with a message naming the bad part.
    """
    if not isinstance(text, str):
        raise RetentionError(f"duration must be a string like '30d', got {type(text).__name__}")
    source = text.strip()
    example = "expected e.g. '30d', '2w', '6m', '1y' or '1y6m'"
    if not source:
        raise RetentionError(f"duration is empty: {example}")
    if re.search(r"[0-9][.,][0-9]", source):
        raise RetentionError(
            f"duration {text!r}: fractions are not supported; use a smaller unit (e.g. '36h', not '1.5d')"
        )
    if re.search(r"\s", source):
        raise RetentionError(f"duration {text!r}: remove the spaces (e.g. '30d', '1y6m')")
    parts: dict[str, int] = {}
    position = 0
    while position < len(source):
        match = _TOKEN.match(source, position)
        if match is None:
            raise RetentionError(
                f"duration {text!r}: unexpected {source[position:]!r} at position {position + 1}: {example}"
            )
        number, unit = match.group(1), match.group(2)
        if unit == "":
            raise RetentionError(f"duration {text!r}: number {number} has no unit; units: {_UNIT_HELP}")
        if unit not in _UNITS:
            hint = " (units are lower-case; 'm' means months)" if unit.lower() in _UNITS else ""
            raise RetentionError(f"duration {text!r}: unknown unit {unit!r}{hint}; units: {_UNIT_HELP}")
        name = _UNITS[unit]
        if name in parts:
            raise RetentionError(f"duration {text!r}: unit {unit!r} is given twice")
        parts[name] = int(number)
        position = match.end()
    if not any(parts.values()):
        raise RetentionError(f"duration {text!r} is zero: keep-within must be longer than zero (or omitted)")
    return CalendarDuration(**parts)


# --------------------------------------------------------------------------------------------------
# Policy and points
# --------------------------------------------------------------------------------------------------

RULE_ORDER: Final = ("keep-last", "keep-hourly", "keep-daily", "keep-weekly", "keep-monthly", "keep-yearly")
"""The count rules, in the order they are applied."""


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Retention for one group of restore points (one policy x one VM).

    Counts are ``None`` (rule off) or a whole number >= 1. ``keep_within`` is a :class:`CalendarDuration`
    (from :func:`parse_duration`) or an exact ``timedelta``. ``timezone`` is the IANA zone in which hours,
    days, weeks, months and years are counted.
    """

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: CalendarDuration | timedelta | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        for rule, count in self.counts():
            if count is None:
                continue
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise RetentionError(
                    f"{rule} must be a whole number of at least 1 (omit it to turn the rule off), "
                    f"got {count!r}"
                )
        within = self.keep_within
        if within is not None:
            if isinstance(within, timedelta):
                if within <= timedelta(0):
                    raise RetentionError(
                        f"keep-within must be longer than zero, got {format_duration(within, minute='min')}"
                    )
            elif not isinstance(within, CalendarDuration):
                raise RetentionError(
                    "keep-within must be a CalendarDuration (see parse_duration) or a timedelta, "
                    f"got {type(within).__name__}"
                )
        if within is None and all(count is None for _, count in self.counts()):
            raise RetentionError(
                "retention policy has no rule: set at least one of keep-last, keep-hourly, keep-daily, "
                "keep-weekly, keep-monthly, keep-yearly or keep-within (an empty policy is refused rather "
                "than guessed to mean 'keep everything' or 'keep only the newest')"
            )
        _load_zone(self.timezone)

    def counts(self) -> tuple[tuple[str, int | None], ...]:
        """``(rule name, count)`` in :data:`RULE_ORDER`."""
        return (
            ("keep-last", self.keep_last),
            ("keep-hourly", self.keep_hourly),
            ("keep-daily", self.keep_daily),
            ("keep-weekly", self.keep_weekly),
            ("keep-monthly", self.keep_monthly),
            ("keep-yearly", self.keep_yearly),
        )

    @property
    def zone(self) -> ZoneInfo:
        return _load_zone(self.timezone)

    def within_text(self) -> str:
        within = self.keep_within
        if within is None:
            return ""
        return str(within) if isinstance(within, CalendarDuration) else format_duration(within, minute="min")

    def describe(self) -> str:
        """E.g. ``keep-last 3, keep-daily 7, keep-within 30d (Europe/Berlin)``."""
        parts = [f"{rule} {count}" for rule, count in self.counts() if count is not None]
        if self.keep_within is not None:
            parts.append(f"keep-within {self.within_text()}")
        return f"{', '.join(parts)} ({self.timezone})"


def _load_zone(name: str) -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise RetentionError(f"time zone must be an IANA name such as 'Europe/Berlin', got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise RetentionError(
            f"unknown time zone {name!r}: expected an IANA name such as 'Europe/Berlin' or 'UTC'"
        ) from None


class RestorePointLike(Protocol):
    """What :func:`evaluate` needs from a restore point; the repository's own type can be passed as is."""

    @property
    def id(self) -> str: ...

    @property
    def time(self) -> datetime:
        """When the point was taken (timezone-aware)."""
        ...

    @property
    def status(self) -> str:
        """``"success"``; anything else (``"failed"``, ``"partial"``, ...) is incomplete."""
        ...

    @property
    def protected(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class RestorePointInfo:
    """A plain restore point (satisfies :class:`RestorePointLike`)."""

    id: str
    time: datetime
    status: str = "success"
    """``"success"`` or anything else (incomplete), as :class:`RestorePointLike` says."""
    protected: bool = False


P = TypeVar("P", bound=RestorePointLike)


@dataclass(frozen=True, slots=True)
class Decision(Generic[P]):
    """The verdict on one point: ``keep`` and a human ``reason``; ``rule`` is a stable tag for tools:
    a rule name (``keep-daily`` ...), ``keep-within``, ``protected``, ``newest-success``,
    ``incomplete-newest`` for kept points; ``superseded``, ``beyond``, ``incomplete`` for removed ones."""

    point: P
    keep: bool
    reason: str
    rule: str


# --------------------------------------------------------------------------------------------------
# Periods
# --------------------------------------------------------------------------------------------------


def _hour_key(local: datetime) -> Hashable:
    # The UTC offset keeps the two real hours of a fall-back "02:00-03:00" apart.
    return (local.date(), local.hour, local.utcoffset())


def _hour_label(local: datetime) -> str:
    text = local.strftime("%Y-%m-%d %H:00")
    if local.replace(fold=1 - local.fold).utcoffset() != local.utcoffset():
        text += f" {local.tzname()}"
    return text


def _week_label(local: datetime) -> str:
    iso = local.isocalendar()
    return f"{iso[0]}-W{iso[1]:02d}"


_Period = tuple[str, Callable[[datetime], Hashable], Callable[[datetime], str]]
_PERIODS: Final[dict[str, _Period]] = {
    "keep-hourly": ("hour", _hour_key, _hour_label),
    "keep-daily": ("day", lambda t: t.date(), lambda t: t.date().isoformat()),
    "keep-weekly": ("ISO week", lambda t: tuple(t.isocalendar())[:2], _week_label),
    "keep-monthly": ("month", lambda t: (t.year, t.month), lambda t: f"{t.year}-{t.month:02d}"),
    "keep-yearly": ("year", lambda t: t.year, lambda t: str(t.year)),
}


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _newest_first(points: Iterable[P]) -> list[P]:
    """The points newest first; :class:`RetentionError` for a naive time or an id seen twice."""
    ordered = list(points)
    seen: set[str] = set()
    for point in ordered:
        if point.time.tzinfo is None or point.time.utcoffset() is None:
            raise RetentionError(f"restore point {point.id!r} has a naive time {point.time.isoformat()}")
        if point.id in seen:
            raise RetentionError(f"restore point id {point.id!r} appears twice")
        seen.add(point.id)
    # Order by instant: aware datetimes of one ZoneInfo compare by wall clock (a fall-back night's 02:50 CEST
    # would sort after its 02:10 CET), so compare in UTC.
    ordered.sort(key=lambda p: (p.time.astimezone(UTC), p.id), reverse=True)
    return ordered


def _keep_last(count: int, candidates: list[int], kept: dict[int, tuple[str, str]]) -> None:
    """keep-last: the ``count`` newest candidates not kept by an earlier rule."""
    used = 0
    for i in candidates:
        if used >= count:
            break
        if i not in kept:
            used += 1
            kept[i] = (f"keep-last #{used}", "keep-last")


def _keep_periods(
    rule: str,
    count: int,
    candidates: list[int],
    local: list[datetime],
    kept: dict[int, tuple[str, str]],
    superseded: dict[int, str],
) -> None:
    """keep-hourly … keep-yearly: the newest point of each of the ``count`` newest periods not covered."""
    unit, key_of, label_of = _PERIODS[rule]
    keys = {i: key_of(local[i]) for i in candidates}
    newest_in: dict[Hashable, int] = {}
    for i in candidates:  # newest first
        newest_in.setdefault(keys[i], i)
    # A period is covered when its NEWEST point is kept. An older point kept by an earlier rule does not
    # cover it: ISO weeks straddle months and years, so keep-weekly's Sunday 27 September does not stand
    # for September when September's newest point is Wednesday the 30th (whose week is kept through
    # Sunday 4 October). Counting September as covered would let a higher keep-weekly, or an added older
    # point, cost the 30th its place: the rules would not be monotonic.
    covered = {key for key, i in newest_in.items() if i in kept}
    used = 0
    for i in candidates:
        if i in kept:
            continue
        key = keys[i]
        if key in covered:
            superseded.setdefault(i, f"not the newest point of {unit} {label_of(local[i])} ({rule})")
            continue
        if used >= count:
            break
        used += 1
        covered.add(key)
        kept[i] = (f"{rule} #{used} ({label_of(local[i])})", rule)


def _beyond_text(policy: RetentionPolicy, active: list[tuple[str, int]]) -> str:
    """Why a successful point no rule keeps is deleted."""
    beyond = ", ".join(f"{rule} {count}" for rule, count in active)
    if policy.keep_within is None:
        return f"beyond {beyond}"
    outside = f"older than keep-within {policy.within_text()} of newest success"
    return f"beyond {beyond}; {outside}" if beyond else outside


def evaluate(points: Iterable[P], policy: RetentionPolicy) -> list[Decision[P]]:
    """Decide, for every point of one retention group, whether it is kept and why. Newest first."""
    ordered = _newest_first(points)
    zone = policy.zone
    local = [p.time.astimezone(zone) for p in ordered]
    instant = [p.time.astimezone(UTC) for p in ordered]

    verdict: dict[int, tuple[bool, str, str]] = {}
    successes = [i for i, p in enumerate(ordered) if p.status == "success"]
    newest_success = successes[0] if successes else None

    # 1-2: protected, incomplete.
    newest_incomplete = next((i for i, p in enumerate(ordered) if p.status != "success"), None)
    for i, point in enumerate(ordered):
        if point.protected:
            verdict[i] = (True, "protected", "protected")
        elif point.status != "success":
            label = point.status if point.status in ("failed", "partial") else f"incomplete ({point.status})"
            if i == newest_incomplete and (newest_success is None or instant[i] > instant[newest_success]):
                verdict[i] = (
                    True,
                    f"newest {label} point, newer than every successful point (kept, does not count)",
                    "incomplete-newest",
                )
            else:
                verdict[i] = (False, f"{label} point", "incomplete")

    # 3: count rules over successful, unprotected points.
    candidates = [i for i in successes if not ordered[i].protected]
    kept: dict[int, tuple[str, str]] = {}  # index -> (reason, rule)
    superseded: dict[int, str] = {}
    active = [(rule, count) for rule, count in policy.counts() if count is not None]
    for rule, count in active:
        if rule == "keep-last":
            _keep_last(count, candidates, kept)
        else:
            _keep_periods(rule, count, candidates, local, kept, superseded)

    # 4: keep-within, anchored on the newest successful point (protected or not).
    cutoff: datetime | None = None
    within = policy.keep_within
    if within is not None and newest_success is not None:
        anchor = instant[newest_success]
        cutoff = within.before(anchor, zone) if isinstance(within, CalendarDuration) else anchor - within
        for i in candidates:
            if i not in kept and instant[i] > cutoff:
                kept[i] = (f"keep-within {policy.within_text()} of newest success", "keep-within")

    # 5: the newest successful point, always.
    if newest_success is not None and newest_success not in verdict:
        if newest_success in kept:
            reason, rule = kept[newest_success]
            kept[newest_success] = (f"newest successful point; {reason}", rule)
        else:
            kept[newest_success] = ("newest successful point", "newest-success")

    beyond = _beyond_text(policy, active)
    for i in candidates:
        if i in kept:
            reason, rule = kept[i]
            verdict[i] = (True, reason, rule)
        elif i in superseded:
            verdict[i] = (False, superseded[i], "superseded")
        else:
            verdict[i] = (False, beyond, "beyond")

    return [Decision(ordered[i], *verdict[i]) for i in range(len(ordered))]
