"""The console's HTML: Jinja2 templates with autoescaping always on, and the few ways a value is
shown — money in its currency's own format, times in UTC with their age, statuses as badges."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

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


def path_segment(value: object) -> str:
    """``value`` as one URL path segment: every character but the unreserved ones percent-encoded.

    Order and invoice numbers are the shop's own text and ids come from Stripe: a ``/`` left as is
    (Jinja's ``urlencode`` keeps it) would split the segment, so ``INV/2024/1`` matched no route
    and ``../orders/A1`` made an invoice's refund form post to order A1's URL. aiohttp's router
    matches the encoded segment and hands the decoded value to ``match_info``. Only a value that
    is nothing but ``.`` or ``..`` stays a dot segment a browser resolves away; it then reaches no
    route (a 404), never another owner's.
    """
    return quote(str(value), safe="")


def owner_url(kind: str, number: str) -> str:
    """The console page of an order or invoice (``kind``), for a link, a form action or a redirect."""
    return f"/console/{kind}s/{path_segment(number)}"


ENVIRONMENT.filters["path_segment"] = path_segment
ENVIRONMENT.globals["owner_url"] = owner_url
# ``urlencode`` leaves ``/`` as is: a template that uses it for a path fails to load rather than
# build a URL that points somewhere else (see path_segment).
del ENVIRONMENT.filters["urlencode"]


# The keys of an exception's detail whose value is money in minor units, as the handlers, the
# refund checks and the payout reconciler raise them. Counts that only sound like money, such as a
# payout's ``amount_differs`` lines, are not listed: they stay as raised.
AMOUNT_KEYS = frozenset(
    {
        "amount",
        "refund_amount",
        "amount_refunded",
        "captured_amount",
        "expected_live_refunds",
        "live_refunds_booked",
        "fetched_live_refunds",
        "payout_amount",
        "lines_net",
        "difference_amount",
        "difference",  # a payout line's, in the payout's currency
    }
)

Money = Callable[[int | None, str | None], str]


def money_formatter(exponents: dict[str, int]) -> Money:
    """``money(amount_minor, currency)`` for a page whose currencies' exponents were read."""

    def money(amount: int | None, currency: str | None) -> str:
        if amount is None or currency is None:
            return "—"
        exponent = exponents.get(currency.lower(), 2)
        major = Decimal(amount).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent))
        return format_money(major, currency)

    return money


def exception_detail(detail: dict[str, Any], money: Money) -> dict[str, Any]:
    """An exception's detail with its amounts in the format of the currency it names (``currency``,
    the payout's for a payout_difference); a detail that names none is shown as raised."""
    currency = detail.get("currency")
    if not isinstance(currency, str):
        return detail  # without a currency its exponent is unknown: a guess would misstate JPY or KWD
    return {key: _shown(key, value, currency, money) for key, value in detail.items()}


def _shown(key: str, value: Any, currency: str, money: Money) -> Any:
    if key in AMOUNT_KEYS and isinstance(value, int) and not isinstance(value, bool):
        return money(value, currency)
    # Nested too: a payout_difference lists its differing lines, each with its difference.
    if isinstance(value, dict):
        return {inner: _shown(inner, item, currency, money) for inner, item in value.items()}
    if isinstance(value, list):
        return [_shown(key, item, currency, money) for item in value]
    return value


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
    money = money_formatter(exponents)
    return ENVIRONMENT.get_template(template).render(
        **context,
        money=money,
        exception_detail=lambda detail: exception_detail(detail, money),
        utc=utc,
        age=lambda moment: age(moment, now),
        badge=badge,
        now=now,
    )
