"""The catalogue of quant types and ladder presets: data in one place, looked up by name.

``bpw`` is the nominal bits per weight of the type's main tensor format (for the mixes, the figure
llama.cpp quotes for a 7-8B model); real files differ with the model's shapes, which is why cards
show measured sizes. ``tensor_types`` lists every ggml tensor type llama.cpp's mix may give a file of
this type, including the fallbacks it uses for rows not divisible by the 256-element k-quant block, and
F32 for norms; ``main`` is the type most weight tensors get.
"""

from __future__ import annotations

import dataclasses

from converters.core.errors import UnknownName

_NORMS = frozenset({"F32"})


@dataclasses.dataclass(frozen=True)
class QuantType:
    name: str  # llama-quantize's name, also used in file names
    bpw: float
    needs_imatrix: bool  # llama.cpp refuses it, or it is unusable, without an importance matrix
    description: str  # one line for the model card
    main: str  # the ggml type most weight tensors get
    tensor_types: frozenset[str]
    large: bool = False  # an "_L" variant: token embedding and output tensors kept at Q8_0

    @property
    def base_name(self) -> str:
        """llama-quantize's name of the type's tensors (an "_L" variant's base), also the name whose
        ``general.file_type`` number it writes (:func:`converters.formats.gguf_meta.file_type`)."""
        return self.name[:-2] if self.large else self.name


def _t(*names: str) -> frozenset[str]:
    return frozenset(names) | _NORMS


_CATALOGUE: list[QuantType] = [
    QuantType("Q8_0", 8.50, False, "Practically lossless; largest common quant, for when memory is not the limit.",
              "Q8_0", _t("Q8_0", "F16", "BF16")),
    QuantType("Q6_K", 6.56, False, "Near-lossless; a safe choice when it fits.",
              "Q6_K", _t("Q6_K", "Q8_0", "F16")),
    QuantType("Q5_K_M", 5.69, False, "High quality, a little smaller than Q6_K.",
              "Q5_K", _t("Q5_K", "Q6_K", "Q5_1", "Q8_0", "F16")),
    QuantType("Q5_K_S", 5.54, False, "High quality, slightly smaller than Q5_K_M.",
              "Q5_K", _t("Q5_K", "Q6_K", "Q5_1", "Q8_0", "F16")),
    QuantType("Q4_K_M", 4.89, False, "The usual default: good quality for its size.",
              "Q4_K", _t("Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "F16")),
    QuantType("Q4_K_S", 4.58, False, "Slightly smaller than Q4_K_M with a little more loss.",
              "Q4_K", _t("Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "F16")),
    QuantType("IQ4_XS", 4.25, False, "Non-linear 4-bit; close to Q4_K_S quality in less space.",
              "IQ4_XS", _t("IQ4_XS", "IQ4_NL", "Q5_K", "Q6_K", "Q8_0", "Q5_0", "Q5_1", "F16")),
    QuantType("IQ4_NL", 4.50, False, "Non-linear 4-bit with 32-element blocks.",
              "IQ4_NL", _t("IQ4_NL", "Q5_K", "Q6_K", "Q8_0", "Q5_0", "Q5_1", "F16")),
    QuantType("Q3_K_L", 4.27, False, "3-bit with larger attention and output tensors; lower quality, for low memory.",
              "Q3_K", _t("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")),
    QuantType("Q3_K_M", 3.91, False, "3-bit mix; noticeable loss, for low memory.",
              "Q3_K", _t("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")),
    QuantType("Q3_K_S", 3.50, False, "Smallest 3-bit k-quant; clear loss.",
              "Q3_K", _t("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")),
    QuantType("IQ3_M", 3.66, False, "Non-linear 3-bit mix; usually better than Q3_K_S at its size.",
              "IQ3_S", _t("IQ3_S", "IQ3_XXS", "IQ4_XS", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0", "F16")),
    QuantType("IQ3_XS", 3.30, True, "Non-linear 3-bit; needs an importance matrix.",
              "IQ3_S", _t("IQ3_S", "IQ3_XXS", "IQ4_XS", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0", "F16")),
    QuantType("IQ3_XXS", 3.06, True, "Very small 3-bit; needs an importance matrix.",
              "IQ3_XXS", _t("IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0", "F16")),
    QuantType("Q2_K", 2.96, False, "2-bit mix; large loss, only when nothing larger fits.",
              "Q2_K", _t("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")),
    QuantType("Q2_K_S", 2.96, True, "2-bit mix, smaller; needs an importance matrix.",
              "Q2_K", _t("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")),
    QuantType("IQ2_M", 2.70, True, "Non-linear 2-bit mix; needs an importance matrix.",
              "IQ2_S", _t("IQ2_S", "IQ2_XS", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL", "Q2_K", "Q4_K", "Q5_K", "Q6_K",
                          "Q4_0", "Q5_0", "Q8_0", "F16")),
    QuantType("IQ2_XS", 2.31, True, "Non-linear 2-bit; needs an importance matrix.",
              "IQ2_XS", _t("IQ2_XS", "IQ2_XXS", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL", "Q2_K", "Q4_K", "Q5_K", "Q6_K",
                           "Q4_0", "Q5_0", "Q8_0", "F16")),
    QuantType("IQ2_XXS", 2.06, True, "Non-linear 2-bit, smallest usable; needs an importance matrix.",
              "IQ2_XXS", _t("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL", "Q2_K", "Q4_K", "Q5_K", "Q6_K",
                            "Q4_0", "Q5_0", "Q8_0", "F16")),
    QuantType("IQ1_M", 1.75, True, "Experimental 1-bit mix; needs an importance matrix.",
              "IQ1_M", _t("IQ1_M", "IQ1_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL", "Q2_K",
                          "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0", "F16")),
    QuantType("BF16", 16.0, False, "Unquantized bfloat16, the reference every quant is measured against.",
              "BF16", _t("BF16", "F16")),
    QuantType("F16", 16.0, False, "Unquantized float16.", "F16", _t("F16")),
]


def _large(q: QuantType) -> QuantType:
    return dataclasses.replace(
        q, name=q.name + "_L", large=True,
        description=q.description.rstrip(".") + "; embedding and output tensors kept at Q8_0.",
        tensor_types=q.tensor_types | {"Q8_0"},
        bpw=q.bpw + 0.1,
    )


_L_BASES = ("Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_L", "Q3_K_M", "Q2_K", "IQ4_XS")
CATALOGUE: dict[str, QuantType] = {q.name: q for q in _CATALOGUE}
CATALOGUE.update({_large(CATALOGUE[b]).name: _large(CATALOGUE[b]) for b in _L_BASES})

LADDERS: dict[str, tuple[str, ...]] = {
    "default": ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S",
                "IQ3_M", "Q2_K"),
    "default+L": ("Q8_0", "Q6_K_L", "Q6_K", "Q5_K_M_L", "Q5_K_M", "Q5_K_S", "Q4_K_M_L", "Q4_K_M", "Q4_K_S",
                  "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "Q2_K_L", "Q2_K"),
    "small": ("Q8_0", "Q4_K_M", "IQ4_XS", "Q2_K"),
    "full": ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_XS", "IQ4_NL", "Q3_K_L", "Q3_K_M",
             "Q3_K_S", "IQ3_M", "IQ3_XS", "IQ3_XXS", "Q2_K", "IQ2_M", "IQ2_XS", "IQ2_XXS", "IQ1_M"),
}


def get(name: str) -> QuantType:
    key = name.strip().upper()
    try:
        return CATALOGUE[key]
    except KeyError:
        raise UnknownName("quant type", name, sorted(CATALOGUE)) from None


def parse_ladder(spec: str | list[str] | tuple[str, ...] | None) -> tuple[QuantType, ...]:
    """A preset name (``default``, ``small``...) or a comma list of types; order kept, duplicates dropped."""
    if spec is None:
        spec = "default"
    if isinstance(spec, str):
        s = spec.strip()
        if s.lower() in LADDERS:
            names: list[str] = list(LADDERS[s.lower()])
        else:
            names = [p for p in (x.strip() for x in s.split(",")) if p]
    else:
        names = list(spec)
    if not names:
        raise UnknownName("ladder", str(spec), sorted(LADDERS))
    out: list[QuantType] = []
    seen: set[str] = set()
    for n in names:
        q = get(n)
        if q.name not in seen:
            seen.add(q.name)
            out.append(q)
    return tuple(out)
