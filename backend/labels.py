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


@dataclass(frozen=True)
class LabelingSchema:
    brush_name: str  # the BrushLabels control that receives masks
    image_name: str  # the Image object it and the prompts label
    image_value: str  # the task data key holding the image URL (``$image`` -> ``image``)
    brush_labels: tuple[str, ...]
    prompts: dict[str, str]  # prompt control name -> "keypoint" | "rectangle"

    def output_label(self, prompt_label: str | None) -> str | None:
        """The brush label for a prompt's label: the same name when the brush has it, else the first one."""
        if prompt_label in self.brush_labels:
            return prompt_label
        return self.brush_labels[0] if self.brush_labels else prompt_label


@lru_cache(maxsize=64)
def parse_config(config: str) -> LabelingSchema:
    """BrushLabels plus KeyPointLabels and/or RectangleLabels on one Image; ``ConfigError`` otherwise."""
    if not isinstance(config, str) or not config.strip():
        raise ConfigError("the labeling config is empty")
    try:
        interface = LabelInterface(config)
    except Exception as error:  # the sdk raises several XML/validation error types
        raise ConfigError(f"the labeling config is not valid XML: {error}") from None
    controls = list(interface.controls)
    for brush in (c for c in controls if c.tag.lower() == "brushlabels"):
        images = [o for o in brush.objects if o.tag.lower() == "image"]
        if not images:
            continue
        image = images[0]
        prompts = {c.name: PROMPT_TAGS[c.tag.lower()] for c in controls
                   if c.tag.lower() in PROMPT_TAGS and image.name in c.to_name}
        if prompts:
            return LabelingSchema(brush.name, image.name, image.value_name or image.value.lstrip("$"),
                                  tuple(brush.labels or ()), prompts)
    found = ", ".join(sorted({c.tag for c in controls})) or "no controls"
    raise ConfigError("the labeling config needs <BrushLabels> and <KeyPointLabels smart=\"true\"> and/or "
                      f"<RectangleLabels smart=\"true\"> on the same <Image> (found: {found})")
