"""Kubernetes resource quantities (`cpu: 1`, `"500m"`, `"1Gi"`) compared by value.

The API server stores every quantity in its canonical form: `cpu: 1` comes back as `"1"`,
`"0.5"` as `"500m"`, `"1024Mi"` as `"1Gi"`. Comparing the spec's spelling with the stored one
as strings sees drift that is not there, and then every poll rewrites the template and posts
DriftReverted. Comparing values sees only real changes.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# Kubernetes' own quantity pattern (the OpenAPI of `resource.Quantity`, as controller-gen writes
# it into CRDs), without the sign: requests and limits are never negative.
PATTERN = (r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
           r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_SPLIT = re.compile(r"^(?P<number>([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(?P<suffix>.*)$")

_BINARY = {f"{p}i": Fraction(2) ** (10 * n) for n, p in enumerate("KMGTPE", start=1)}
_DECIMAL = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 10**3), "": Fraction(1),
            "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
            "P": Fraction(10**15), "E": Fraction(10**18)}
# The API server keeps no precision finer than 1n: it rounds smaller fractions up to it.
_NANO = Fraction(1, 10**9)


class QuantityError(ValueError):
    pass


def parse(value: object) -> Fraction:
    """The exact value of a quantity as a Pod spec accepts it: a whole number or a string."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        # A float (0.5) is rejected by the API server's int-or-string type as well.
        raise QuantityError(f"{value!r} is not a quantity: write a whole number or a string like \"500m\"")
    if isinstance(value, int):
        if value < 0:
            raise QuantityError(f"{value!r} is negative")
        return Fraction(value)
    if not re.match(PATTERN, value):
        raise QuantityError(f"{value!r} is not a quantity like \"500m\", \"1\", \"256Mi\" or \"1e3\"")
    match = _SPLIT.match(value)
    assert match is not None  # PATTERN matched, so this does
    number, suffix = Fraction(match["number"]), match["suffix"]
    if suffix in _BINARY:
        exact = number * _BINARY[suffix]
    elif suffix in _DECIMAL:
        exact = number * _DECIMAL[suffix]
    else:  # an exponent: e3, E-2
        exponent = suffix[1:]
        if not re.fullmatch(r"[+-]?[0-9]+", exponent):
            raise QuantityError(f"{value!r}: the exponent must be a whole number")
        exact = number * Fraction(10) ** int(exponent)
    return Fraction(math.ceil(exact / _NANO)) * _NANO


def comparable(value: object) -> object:
    """The value for comparisons, or `value` itself when it is not a quantity (left to the
    API server to reject)."""
    try:
        return parse(value)
    except QuantityError:
        return value
