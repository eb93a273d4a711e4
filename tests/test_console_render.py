"""How the console shows a value (worker/backoffice/console/render.py): money with no amount or
currency, times given as a datetime, a date or Unix seconds, and their age in the largest unit; a
shop's or Stripe's id in a URL path."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import jinja2
import pytest

from worker.backoffice.console import render

NOW = datetime(2024, 5, 10, 12, 0, 0, tzinfo=UTC)


def test_money_without_an_amount_or_a_currency_is_a_dash() -> None:
    """A missing amount or currency shows as a dash; otherwise the amount in its currency's format."""
    money = render.money_formatter({"usd": 2})
    assert (money(None, "usd"), money(1234, None), money(1234, "usd")) == ("—", "—", "$12.34")


def test_a_moment_is_shown_in_utc_whatever_it_is_given_as() -> None:
    """None is a dash; Unix seconds and an aware datetime in another zone show as the same UTC
    time; a date shows as the date alone."""
    assert render.utc(None) == "—"
    assert render.utc(int(NOW.timestamp())) == "2024-05-10 12:00:00 UTC"
    assert render.utc(NOW.astimezone(timezone(timedelta(hours=2)))) == "2024-05-10 12:00:00 UTC"
    assert render.utc(date(2024, 5, 1)) == "2024-05-01"


@pytest.mark.parametrize(
    ("moment", "shown"),
    [
        (None, ""),
        (NOW - timedelta(seconds=42), "42 s ago"),
        (NOW - timedelta(minutes=5, seconds=59), "5 min ago"),
        (NOW - timedelta(hours=3), "3 h ago"),
        (NOW - timedelta(days=1, hours=23), "1 day ago"),
        (NOW + timedelta(days=2), "in 2 days"),
        (int((NOW - timedelta(minutes=2)).timestamp()), "2 min ago"),
    ],
    ids=["none", "seconds", "minutes", "hours", "one-day", "ahead", "unix-seconds"],
)
def test_an_age_is_said_in_its_largest_whole_unit(moment: datetime | int | None, shown: str) -> None:
    """No moment has no age; otherwise the largest whole unit (days pluralised), ahead or ago,
    whether the moment is a datetime or Unix seconds."""
    assert render.age(moment, NOW) == shown


def test_an_id_in_a_url_path_is_one_segment_whatever_it_contains() -> None:
    """A number or id goes into a URL path with every reserved character encoded, "/" too: it
    stays one segment, so it neither misses its route nor names another owner's."""
    assert render.path_segment("INV/2024/1") == "INV%2F2024%2F1"
    assert render.path_segment("../orders/A1") == "..%2Forders%2FA1"
    assert render.path_segment("a?b#c%d e&f+g") == "a%3Fb%23c%25d%20e%26f%2Bg"
    assert render.path_segment(42) == "42"
    assert render.owner_url("invoice", "INV/2024/1") == "/console/invoices/INV%2F2024%2F1"
    assert render.owner_url("order", "ORD-1") == "/console/orders/ORD-1"


def test_every_template_loads_and_none_can_use_urlencode() -> None:
    """Every console template compiles; ``urlencode`` (which keeps "/") is no filter here, so a
    template that put an id into a path with it would fail to load rather than link elsewhere."""
    names = render.ENVIRONMENT.list_templates()
    assert "owner.html.j2" in names
    for name in names:
        render.ENVIRONMENT.get_template(name)
    with pytest.raises(jinja2.TemplateAssertionError):
        render.ENVIRONMENT.from_string("{{ number | urlencode }}")
