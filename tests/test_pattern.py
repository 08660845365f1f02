import pytest

from knsparse import Pattern


@pytest.mark.parametrize(
    "spec,k,n", [("2:4", 2, 4), ("6:12", 6, 12), ("8:16", 8, 16), ("12:16", 12, 16), (" 1:2 ", 1, 2)]
)
def test_parse_kn(spec, k, n):
    p = Pattern.parse(spec)
    assert (p.k, p.n) == (k, n)
    assert p.density == pytest.approx(k / n)
    assert str(p) == f"{k}:{n}"


def test_parse_unstructured():
    p = Pattern.parse("unstructured")
    assert p.is_unstructured and str(p) == "unstructured"
    with pytest.raises(ValueError):
        _ = p.density


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "1:1", "2:0", "2.5:4", "a:b", "2-4", "", "2:4:8"])
def test_parse_rejects_with_input_quoted(bad):
    with pytest.raises(ValueError) as err:
        Pattern.parse(bad)
    assert repr(bad) in str(err.value)


def test_parse_rejects_non_string():
    with pytest.raises(TypeError):
        Pattern.parse(24)
