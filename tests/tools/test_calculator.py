"""The calculator's evaluator: correct results and refusals."""

from __future__ import annotations

import math
import time

import pytest

from agentmesh.services.tools.builtin import MAX_INT_BITS, CalculatorError, evaluate


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("-7 % 3", 2),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("2 ** 3 ** 2", 512),  # right-associative, as in Python and mathematics
        ("-2 ** 2", -4),
        ("+-+3", -3),
        ("1_000 * 3", 3000),
        ("0.1 + 0.2", 0.1 + 0.2),
        ("1e3 / 4", 250.0),
        ("sqrt(16) + abs(-3)", 7.0),
        ("log(e)", 1.0),
        ("log(8, 2)", 3.0),
        ("log10(1000)", 3.0),
        ("round(2.675, 2)", 2.67),  # binary floating point, like Python
        ("round(7.5)", 8),
        ("max(1, 5, 3) - min(4, 2)", 3),
        ("factorial(20)", 2432902008176640000),
        ("gcd(84, 36)", 12),
        ("hypot(3, 4)", 5.0),
        ("floor(-2.5) + ceil(2.1)", 0),
        ("2 ** 4000 // 2 ** 3999", 2),
        ("12345678901234567890 * 98765432109876543210", 12345678901234567890 * 98765432109876543210),
    ],
)
def test_results(expression, expected):
    value = evaluate(expression)
    assert value == expected
    assert type(value) is type(expected)


def test_trigonometry_and_constants():
    assert math.isclose(evaluate("sin(pi / 2)"), 1.0)
    assert math.isclose(evaluate("cos(tau)"), 1.0)
    assert math.isclose(evaluate("degrees(atan2(1, 1))"), 45.0)


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("sqrt(-1)", "math error"),
        ("log(0)", "math error"),
        ("(-8) ** (1/3)", "not a real number"),
        ("x + 1", "unknown name 'x'"),
        ("__import__('os')", "unknown function '__import__'"),
        ("__import__('os').system('true')", "attribute access"),
        ("(1).__class__", "attribute access"),
        ("().__class__.__bases__[0].__subclasses__()", "attribute access"),
        ("math.sqrt(4)", "attribute access"),
        ("eval('1')", "unknown function 'eval'"),
        ("open('/etc/passwd')", "unknown function 'open'"),
        ("'a' * 10", "only numbers are allowed"),
        ("True + 1", "only numbers are allowed"),
        ("2j * 2", "only numbers are allowed"),
        ("[1, 2]", "List is not allowed"),
        ("lambda: 1", "lambda is not allowed"),
        ("1 if 1 else 2", "IfExp is not allowed"),
        ("(y := 3)", "NamedExpr is not allowed"),
        ("1 < 2", "comparisons are not supported"),
        ("2 ^ 10", "write powers as 2**10"),
        ("1 << 10", "LShift is not supported"),
        ("~1", "Invert is not supported"),
        ("sqrt", "is a function"),
        ("sqrt(1, 2)", "sqrt() takes 1 argument, got 2"),
        ("round(1.5, ndigits=1)", "no keyword arguments"),
        ("max(*[1, 2])", "unpacking"),
        ("max()", "max() takes 1 to 64 arguments, got 0"),
        ("factorial(2.5)", "whole number"),
        ("factorial(-1)", "negative"),
        ("1 +", "not a valid expression"),
        ("import os", "not a valid expression"),
        ("1; 2", "not a valid expression"),
        ("", "empty"),
        ("1e999", "too large"),
        ("1.5 ** 5000", "overflow"),
        ("exp(1000)", "overflow"),
        ("2 ** 4000 * 1.5", "overflow"),
    ],
)
def test_refusals_are_calculator_errors(expression, reason):
    with pytest.raises(CalculatorError) as err:
        evaluate(expression)
    assert reason in str(err.value)


@pytest.mark.parametrize(
    "expression",
    [
        "9 ** 9 ** 9",
        "2 ** 5000",
        "10 ** 100000000",
        "(2 ** 4000) * (2 ** 4000)",
        "factorial(100000)",
        "round(10 ** 50, -1000000000)",
        "(2 ** 2048) ** 3",
        "2 ** 4095 + 2 ** 4095",
    ],
)
def test_huge_numbers_are_refused_fast(expression):
    start = time.perf_counter()
    with pytest.raises(CalculatorError) as err:
        evaluate(expression)
    assert time.perf_counter() - start < 0.5
    assert "refused" in str(err.value) or "at most" in str(err.value)


def test_the_integer_limit_is_exact():
    assert evaluate(f"2 ** {MAX_INT_BITS - 1}") == 2 ** (MAX_INT_BITS - 1)
    with pytest.raises(CalculatorError):
        evaluate(f"2 ** {MAX_INT_BITS}")


def test_long_and_deep_input_is_refused():
    with pytest.raises(CalculatorError) as err:
        evaluate("1+" * 600 + "1")
    assert "limit is 1000" in str(err.value)
    with pytest.raises(CalculatorError) as err:
        evaluate("-" * 200 + "1")
    assert "nests deeper" in str(err.value)
    with pytest.raises(CalculatorError) as err:
        evaluate("(" * 250 + "1" + ")" * 250)
    assert "not a valid expression" in str(err.value)
    with pytest.raises(CalculatorError) as err:
        evaluate("1\x00+1")
    assert "not a valid expression" in str(err.value)
