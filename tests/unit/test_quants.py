import pytest

from converters.core import quants
from converters.formats import gguf_meta
from converters.core.errors import UnknownName


def test_default_ladder_is_the_documented_one():
    names = [q.name for q in quants.parse_ladder("default")]
    assert names == ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_L", "Q3_K_M",
                     "Q3_K_S", "IQ3_M", "Q2_K"]


@pytest.mark.parametrize("spec,expected", [
    ("Q8_0,Q4_K_M", ["Q8_0", "Q4_K_M"]),
    ("q4_k_m, Q8_0 ,q4_k_m", ["Q4_K_M", "Q8_0"]),  # case-insensitive, order kept, duplicates dropped
    (["IQ4_XS", "Q2_K"], ["IQ4_XS", "Q2_K"]),
    ("small", ["Q8_0", "Q4_K_M", "IQ4_XS", "Q2_K"]),
    ("Q4_K_M_L", ["Q4_K_M_L"]),
])
def test_parse_ladder(spec, expected):
    assert [q.name for q in quants.parse_ladder(spec)] == expected


@pytest.mark.parametrize("spec", ["Q4_K_X", "Q8_0,NOPE", ","])
def test_unknown_names_are_clear_errors(spec):
    with pytest.raises(UnknownName) as ei:
        quants.parse_ladder(spec)
    assert "unknown" in str(ei.value)


def test_catalogue_facts():
    for q in quants.CATALOGUE.values():
        assert q.description and q.bpw > 1
        assert q.main in q.tensor_types and "F32" in q.tensor_types
    assert quants.get("IQ2_XXS").needs_imatrix and quants.get("IQ1_M").needs_imatrix
    assert not quants.get("Q4_K_M").needs_imatrix
    large = quants.get("Q4_K_M_L")
    assert large.large and large.base_name == "Q4_K_M" and \
        gguf_meta.file_type(large.base_name) == gguf_meta.file_type(quants.get("Q4_K_M").base_name)
    # nominal bits fall along the default ladder
    bpws = [q.bpw for q in quants.parse_ladder("default")]
    assert bpws[0] == max(bpws) and bpws[-1] == min(bpws)
