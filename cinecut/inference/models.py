"""SceneDescription: what the vision model says about one keyframe.

Field names are upstream's exactly (upstream rebuilds it with ``SceneDescription(**description)``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

import pydantic


@dataclass(frozen=True, slots=True)
class SceneDescription:
    """The four facets CineCut's narrative stage uses to pick and order shots."""

    visual_content: str
    mood: str
    action: str
    setting: str

    def to_dict(self) -> dict[str, str]:
        """The exact mapping upstream expects (no extra keys)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> SceneDescription:
        """Strict validation: exactly the four string fields, else ValueError."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"scene description must have exactly {sorted(names)}")
        if not all(isinstance(v, str) for v in data.values()):
            raise ValueError("scene description fields must be strings")
        return cls(**data)


SCENE_DESCRIPTION_FIELDS: Final = tuple(f.name for f in fields(SceneDescription))

#: JSON schema handed to llama.cpp's grammar-constrained sampler (``response_format``).
SCENE_DESCRIPTION_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {name: {"type": "string"} for name in SCENE_DESCRIPTION_FIELDS},
    "required": list(SCENE_DESCRIPTION_FIELDS),
    "additionalProperties": False,
}


def _validator() -> Any:
    """Upstream validates with ``pydantic.TypeAdapter(SceneDescription)`` (pydantic 2); Debian 12 ships
    pydantic 1, which has no TypeAdapter. Both paths raise ``pydantic.ValidationError``, the type
    upstream's callers catch."""
    adapter = getattr(pydantic, "TypeAdapter", None)
    if adapter is not None:
        return adapter(SceneDescription).validate_python
    # pydantic 1 cannot validate into a slotted dataclass: a model of strict strings (pydantic 2 does not
    # coerce to str either) checks the data, then the dataclass is built from it.
    model = pydantic.create_model(
        "SceneDescriptionModel", **{name: (pydantic.StrictStr, ...) for name in SCENE_DESCRIPTION_FIELDS}
    )
    return lambda data: SceneDescription(**model.parse_obj(data).dict())


_validate: Final = _validator()


def validate_scene_description(data: dict[str, Any]) -> SceneDescription:
    """Upstream's validator: a SceneDescription from a dict; raises ``pydantic.ValidationError`` on
    non-conforming data (a missing field, a non-string value)."""
    result: SceneDescription = _validate(data)
    return result


def parse_scene_description(raw: str | bytes | dict[str, Any] | None) -> SceneDescription | None:
    """Turn a model answer (JSON text or an already-decoded dict) into a SceneDescription, or None.

    Extra keys a model may add are dropped and missing ones make the frame a failure: upstream stores a
    failed frame as ``description: null``, never a half-filled object.
    """
    if raw is None:
        return None
    data: Any = raw
    if isinstance(raw, str | bytes):
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            return None
    if not isinstance(data, dict):
        return None
    picked = {name: data.get(name) for name in SCENE_DESCRIPTION_FIELDS}
    if not all(isinstance(v, str) and v.strip() for v in picked.values()):
        return None
    return SceneDescription(**{k: v.strip() for k, v in picked.items()})
