"""Label tables: what each integer value of a label map means (name, colour, standard terminology).

Terminology follows Slicer's serialised terminology entry, seven ``~``-separated fields::

    context name ~ category ~ type ~ type modifier ~ anatomic context name ~ anatomic region ~ region modifier

where each coded field is ``scheme^value^meaning`` (DICOM coded concept, e.g. ``SCT^12738006^Brain``) and an
empty code is ``^^``. Segments carrying it show standard names in Slicer's Segment Editor and export to
DICOM SEG with the right codes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
DEFAULT_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class CodedEntry:
    """One DICOM coded concept: coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str

    def to_slicer(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    @classmethod
    def from_slicer(cls, text: str) -> CodedEntry | None:
        parts = text.split("^")
        if len(parts) != 3:
            raise ValueError(f"not a coded entry 'scheme^value^meaning': {text!r}")
        if not any(parts):
            return None
        return cls(*parts)


_EMPTY_CODE = "^^"


@dataclass(frozen=True)
class Terminology:
    """A segment's standard terminology (DICOM SEG style category / type / optional modifiers)."""

    category: CodedEntry
    type: CodedEntry
    type_modifier: CodedEntry | None = None
    anatomic_region: CodedEntry | None = None
    anatomic_region_modifier: CodedEntry | None = None
    context_name: str = DEFAULT_TERMINOLOGY_CONTEXT
    anatomic_context_name: str = DEFAULT_ANATOMIC_CONTEXT

    def to_slicer_string(self) -> str:
        """Serialises in the format Slicer stores in a segment's terminology tag."""

        def code(entry: CodedEntry | None) -> str:
            return entry.to_slicer() if entry is not None else _EMPTY_CODE

        has_anatomy = self.anatomic_region is not None
        return "~".join(
            [
                self.context_name,
                code(self.category),
                code(self.type),
                code(self.type_modifier),
                self.anatomic_context_name if has_anatomy else "",
                code(self.anatomic_region),
                code(self.anatomic_region_modifier),
            ]
        )

    @classmethod
    def from_slicer_string(cls, text: str) -> Terminology:
        fields = text.split("~")
        if len(fields) != 7:
            raise ValueError(f"a Slicer terminology entry has 7 '~'-separated fields, got {len(fields)}: {text!r}")
        category = CodedEntry.from_slicer(fields[1])
        type_ = CodedEntry.from_slicer(fields[2])
        if category is None or type_ is None:
            raise ValueError(f"terminology entry without category or type: {text!r}")
        return cls(
            category=category,
            type=type_,
            type_modifier=CodedEntry.from_slicer(fields[3]),
            anatomic_region=CodedEntry.from_slicer(fields[5]),
            anatomic_region_modifier=CodedEntry.from_slicer(fields[6]),
            context_name=fields[0],
            anatomic_context_name=fields[4] or DEFAULT_ANATOMIC_CONTEXT,
        )


@dataclass(frozen=True)
class LabelInfo:
    """One label value of a label map and what it means.

    Attributes:
        value: the integer voxel value (> 0; 0 is background).
        name: the segment name shown to the user.
        color: RGB in 0..1; None picks a distinct colour from the label value (:func:`default_color`).
        terminology: a :class:`Terminology`, a Slicer terminology string, or None.
    """

    value: int
    name: str
    color: tuple[float, float, float] | None = None
    terminology: Terminology | str | None = None

    def rgb(self) -> tuple[float, float, float]:
        """The label's colour, or its default colour when none was given."""
        return self.color if self.color is not None else default_color(self.value)

    def terminology_string(self) -> str | None:
        if self.terminology is None:
            return None
        if isinstance(self.terminology, Terminology):
            return self.terminology.to_slicer_string()
        return str(self.terminology)


def as_label_table(labels: Iterable[Any] | Mapping[int, Any]) -> list[LabelInfo]:
    """Normalises a label table given in any of the usual shapes into a list of :class:`LabelInfo`.

    Accepts ``LabelInfo`` objects, objects with ``value``/``name``/``color`` attributes, dicts with those
    keys, or a mapping ``{value: name}`` / ``{value: {"name": ..., "color": ...}}``.

    Raises:
        ValueError: for a background (0) entry, a duplicate value or name, or a colour outside 0..1.
    """
    if isinstance(labels, Mapping):
        items: list[Any] = []
        for value, entry in labels.items():
            if isinstance(entry, str):
                items.append(LabelInfo(int(value), entry))
            elif isinstance(entry, Mapping):
                items.append({"value": value, **entry})
            else:
                items.append(entry)
    else:
        items = list(labels)

    table: list[LabelInfo] = []
    for item in items:
        if isinstance(item, LabelInfo):
            info = item
        elif isinstance(item, Mapping):
            info = LabelInfo(
                value=int(item["value"]),
                name=str(item["name"]),
                color=_color_or_none(item.get("color")),
                terminology=item.get("terminology"),
            )
        else:
            info = LabelInfo(
                value=int(item.value),
                name=str(item.name),
                color=_color_or_none(getattr(item, "color", None)),
                terminology=getattr(item, "terminology", None),
            )
        table.append(info)

    seen_values: set[int] = set()
    seen_names: set[str] = set()
    for info in table:
        if info.value <= 0:
            raise ValueError(f"label '{info.name}' has value {info.value}: label values must be > 0 (0 is background)")
        if info.value in seen_values:
            raise ValueError(f"label value {info.value} appears twice in the label table")
        if info.name in seen_names:
            raise ValueError(f"label name '{info.name}' appears twice in the label table; segment names must be unique")
        if info.color is not None and (len(info.color) != 3 or not all(0.0 <= float(c) <= 1.0 for c in info.color)):
            raise ValueError(f"label '{info.name}' colour {info.color} must be three numbers in 0..1")
        seen_values.add(info.value)
        seen_names.add(info.name)
    return table


def _color_or_none(color: Any) -> tuple[float, float, float] | None:
    return None if color is None else tuple(float(c) for c in color)


def default_color(value: int) -> tuple[float, float, float]:
    """A distinct, stable colour for a label value: hues spaced by the golden angle, alternating lightness.

    Neighbouring label values get clearly different colours, and the same value always gets the same colour,
    so a model without a colour table still gives a readable, reproducible segmentation.
    """
    import colorsys

    hue = (value * 0.618033988749895) % 1.0
    lightness = 0.55 if value % 2 else 0.42
    red, green, blue = colorsys.hls_to_rgb(hue, lightness, 0.65)
    return (round(red, 4), round(green, 4), round(blue, 4))


# Codes for the brain tissue classes DeepSeg's demo and default model produce. Source: DICOM PS3.16 CID 7140
# "Brain Structure for Volumetric Measurement" and CID 7150 "Segmentation Property Category".
_TISSUE = CodedEntry("SCT", "85756007", "Tissue")
_ANATOMICAL_STRUCTURE = CodedEntry("SCT", "123037004", "Anatomical Structure")
_BODY_SUBSTANCE = CodedEntry("SCT", "91720002", "Body Substance")

#: What a segment is called in standard terms when its model says nothing: Slicer's own default ("Tissue"), so that
#: every segment DeepSeg writes can be exported as DICOM SEG, which needs a category and a type.
DEFAULT_TERMINOLOGY = Terminology(_TISSUE, _TISSUE)

BRAIN_TERMS = {
    "brain": Terminology(_ANATOMICAL_STRUCTURE, CodedEntry("SCT", "12738006", "Brain")),
    "grey matter": Terminology(_TISSUE, CodedEntry("SCT", "40146001", "Cerebral Gray Matter")),
    "white matter": Terminology(_TISSUE, CodedEntry("SCT", "68523003", "Cerebral White Matter")),
    "cerebrospinal fluid": Terminology(_BODY_SUBSTANCE, CodedEntry("SCT", "65216001", "Cerebrospinal fluid")),
}
