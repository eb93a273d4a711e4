"""The console's HTML: Jinja2 templates with autoescaping always on, and the few ways a value is
shown — money in its currency's own format, times in UTC with their age, statuses as badges."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import jinja2

from worker.backoffice.money import format_money

BADGES = {
    "paid": ("Paid", "ok"),
    "partially_refunded": ("Partially refunded", "warn"),
    "refunded": ("Fully refunded", "muted"),
    "voided": ("Voided", "muted"),
    "charged_back": ("Charged back", "bad"),
    "rejected": ("Rejected", "bad"),
    "pending": ("Pending", "muted"),
    "unpaid": ("Unpaid", "muted"),
}

ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("worker.backoffice.console", "templates"),
    autoescape=True,  # every value, whatever the template's name: a note with HTML shows as text
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def money_formatter(exponents: dict[str, int]) -> Callable[[int | None, str | None], str]:
    """``money(amount_minor, currency)`` for a page whose currencies' exponents were read."""

    def money(amount: int | None, currency: str | None) -> str:
        if amount is None or currency is None:
            return "—"
        exponent = exponents.get(currency.lower(), 2)
        major = Decimal(amount).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent))
        return format_money(major, currency)

    return money


def utc(moment: datetime | date | int | None) -> str:
    if moment is None:
        return "—"
    if isinstance(moment, int):
        moment = datetime.fromtimestamp(moment, UTC)
    if not isinstance(moment, datetime):
        return moment.isoformat()
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(moment: datetime | int | None, now: datetime) -> str:
    """ "3 min ago", "in 2 days": how far a moment is from now, in the largest whole unit."""
    if moment is None:
        return ""
    if isinstance(moment, int):
        moment = datetime.fromtimestamp(moment, UTC)
    seconds = int((now - moment).total_seconds())
    ahead, seconds = seconds < 0, abs(seconds)
    for unit_s, unit in ((86400, "day"), (3600, "h"), (60, "min")):
        if seconds >= unit_s:
            count = seconds // unit_s
            text = f"{count} {unit}{'s' if unit == 'day' and count != 1 else ''}"
            break
    else:
        text = f"{seconds} s"
    return f"in {text}" if ahead else f"{text} ago"


def badge(status: str) -> tuple[str, str]:
    return BADGES.get(status, (status.replace("_", " ").capitalize(), "muted"))


def currencies_in(value: Any) -> set[str]:
    """Every ``currency`` a page's data names, to read their exponents in one query."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "currency" and isinstance(item, str):
                found.add(item.lower())
            else:
                found |= currencies_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            found |= currencies_in(item)
    return found


def page(template: str, context: dict[str, Any], exponents: dict[str, int]) -> str:
    now = datetime.now(UTC)
    return ENVIRONMENT.get_template(template).render(
        **context,
        money=money_formatter(exponents),
        utc=utc,
        age=lambda moment: age(moment, now),
        badge=badge,
        now=now,
    )
