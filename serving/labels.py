"""The labeling config, read with label_studio_sdk: which controls prompt and which one receives the mask."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from label_studio_sdk.label_interface import LabelInterface

PROMPT_TAGS = {"keypointlabels": "keypoint", "keypoint": "keypoint", "rectanglelabels": "rectangle",
               "rectangle": "rectangle"}

SMART_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true" zoomControl="true"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Object" background="#FF0000"/>
  </BrushLabels>
  <KeyPointLabels name="point" toName="image" smart="true">
    <Label value="Object" smart="true" background="#00FF00" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Object" smart="true" background="#0000FF" showInline="true"/>
  </RectangleLabels>
</View>"""


class ConfigError(ValueError):
    """The labeling config cannot drive this backend."""


OUTPUT_KINDS = {"brushlabels": "brush", "polygonlabels": "polygon", "rectanglelabels": "box"}


@dataclass(frozen=True)
class Target:
    """A control that receives the masks: ``kind`` brush, polygon or box."""

    name: str
    kind: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelingSchema:
    image_name: str  # the Image object the prompts and the targets label
    image_value: str  # the task data key holding the image URL (``$image`` -> ``image``)
    prompts: dict[str, str]  # prompt control name -> "keypoint" | "rectangle"
    targets: tuple[Target, ...]  # in the config's order

    def select(self, wanted: tuple[str, ...] = ()) -> tuple[Target, ...]:
        """The targets an ``outputs`` option names (kinds or control names; empty: all of them)."""
        if not wanted:
            return self.targets
        chosen = tuple(t for t in self.targets if t.kind in wanted or t.name in wanted)
        if not chosen:
            have = ", ".join(f"{t.name} ({t.kind})" for t in self.targets)
            raise ConfigError(f"the project's outputs option {list(wanted)} matches none of the labeling "
                              f"config's targets: {have}")
        return chosen

    @staticmethod
    def labels_for(targets: tuple[Target, ...], prompt_label: str | None) -> dict[str, list[str]]:
        """Each target's label for a prompt's label: the same name in the targets that have it; when none has
        it (or the prompt has none), each target's first label."""
        having = [t for t in targets if prompt_label is not None and prompt_label in t.labels]
        if having:
            return {t.name: [prompt_label] for t in having}
        return {t.name: list(t.labels[:1]) for t in targets}


def _is_smart(control) -> bool:
    return any(str(control.attr.get(key, "")).lower() in ("true", "1") for key in ("smart", "smartOnly"))


@lru_cache(maxsize=64)
def parse_config(config: str) -> LabelingSchema:
    """Smart KeyPointLabels and/or RectangleLabels (the prompts) and at least one BrushLabels, PolygonLabels
    or non-smart RectangleLabels (the targets) on one Image; ``ConfigError`` otherwise."""
    if not isinstance(config, str) or not config.strip():
        raise ConfigError("the labeling config is empty")
    try:
        interface = LabelInterface(config)
    except Exception as error:  # the sdk raises several XML/validation error types
        raise ConfigError(f"the labeling config is not valid XML: {error}") from None
    controls = list(interface.controls)
    for image in (o for o in interface.objects if o.tag.lower() == "image"):
        on_image = [c for c in controls if image.name in c.to_name]
        prompts = {c.name: PROMPT_TAGS[c.tag.lower()] for c in on_image if c.tag.lower() in PROMPT_TAGS
                   and (c.tag.lower().startswith("keypoint") or _is_smart(c))}
        targets = tuple(Target(c.name, OUTPUT_KINDS[c.tag.lower()], tuple(c.labels or ()))
                        for c in on_image if c.tag.lower() in OUTPUT_KINDS and c.name not in prompts)
        if prompts and targets:
            return LabelingSchema(image.name, image.value_name or image.value.lstrip("$"), prompts, targets)
    found = ", ".join(sorted({c.tag for c in controls})) or "no controls"
    raise ConfigError("the labeling config needs, on the same <Image>, a prompt (<KeyPointLabels smart=\"true\"> "
                      "and/or <RectangleLabels smart=\"true\">) and a target for the masks (<BrushLabels>, "
                      f"<PolygonLabels> or a non-smart <RectangleLabels>) (found: {found})")
