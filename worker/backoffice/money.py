"""Money as a buyer reads it: ¥110,000, $20.00, €12.50, 1.500 KWD.

The exponent of a currency is the database's (``finance.major_units``, the one list of zero- and
three-decimal currencies): callers pass the major amount it computed, whose scale is the
currency's, and this only adds the grouping and the symbol.
"""

from __future__ import annotations

from decimal import Decimal

# Only symbols nobody misreads: "$" alone means USD here; CAD, AUD, … are written with their code.
_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "inr": "₹", "krw": "₩"}


def format_money(major: Decimal, currency: str) -> str:
    """``major`` in the currency's own scale (Decimal('20.00'), Decimal('110000'), Decimal('1.500'))."""
    sign = "-" if major < 0 else ""
    digits = format(abs(major), ",f")
    symbol = _SYMBOLS.get(currency.lower())
    if symbol is not None:
        return f"{sign}{symbol}{digits}"
    return f"{sign}{digits} {currency.upper()}"
