import pytest

from knsparse import Pattern
from knsparse.core.pattern import NOT_A_PATTERN


@pytest.mark.parametrize(
    "spec,k,n", [("2:4", 2, 4), ("6:12", 6, 12), ("8:16", 8, 16), ("12:16", 12, 16), (" 1:2 ", 1, 2)]
)
def test_parse_kn(spec, k, n):
    p = Pattern.parse(spec)
    assert (p.k, p.n) == (k, n)
    assert p.density == pytest.approx(k / n)
    assert str(p) == f"{k}:{n}"


def test_unstructured_is_not_a_pattern():
    """Unstructured sparsity travels as a fraction; every k:n entry point refuses it with one message."""
    with pytest.raises(ValueError, match="not a k:n pattern") as err:
        Pattern.parse("unstructured")
    assert str(err.value) == NOT_A_PATTERN


@pytest.mark.parametrize("k,n", [(-1, 4), (3, 2), (0, 4), (4, 4), (0, 0), (2, 0)])
def test_construction_validates(k, n):
    with pytest.raises(ValueError, match=f"{k}:{n}"):
        Pattern(k, n)


@pytest.mark.parametrize("k,n", [(2.0, 4), ("2", 4), (True, 4)])
def test_construction_needs_integers(k, n):
    with pytest.raises(TypeError, match="integers"):
        Pattern(k, n)


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "1:1", "2:0", "2.5:4", "a:b", "2-4", "", "2:4:8"])
def test_parse_rejects_with_input_quoted(bad):
    with pytest.raises(ValueError) as err:
        Pattern.parse(bad)
    assert repr(bad) in str(err.value)


def test_parse_rejects_non_string():
    with pytest.raises(TypeError):
        Pattern.parse(24)
