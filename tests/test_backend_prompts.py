"""Labeling configs (label_studio_sdk) and Label Studio contexts -> pixel prompts."""

import pytest

from serving.jobs import JobError, SegmentJob
from backend.labels import SMART_CONFIG, ConfigError, parse_config
from backend.prompts import PromptError, parse_context


def test_smart_config():
    schema = parse_config(SMART_CONFIG)
    assert (schema.brush_name, schema.image_name, schema.image_value) == ("mask", "image", "image")
    assert schema.prompts == {"point": "keypoint", "box": "rectangle"}
    assert schema.output_label("Object") == "Object" and schema.output_label("Other") == "Object"


def test_keypoints_only_config_on_another_data_key():
    schema = parse_config('<View><Image name="img" value="$photo"/>'
                          '<BrushLabels name="b" toName="img"><Label value="car"/></BrushLabels>'
                          '<KeyPointLabels name="k" toName="img" smart="true"><Label value="car"/>'
                          '</KeyPointLabels></View>')
    assert (schema.image_value, schema.prompts) == ("photo", {"k": "keypoint"})


@pytest.mark.parametrize("config, message", [
    ("", "empty"),
    ("<View><Image", "not valid XML"),
    ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="a"/></RectangleLabels>'
     '</View>', "BrushLabels"),
    ('<View><Image name="i" value="$i"/><Image name="j" value="$j"/><BrushLabels name="b" toName="i">'
     '<Label value="a"/></BrushLabels><KeyPointLabels name="k" toName="j"><Label value="a"/></KeyPointLabels></View>',
     "same <Image>"),
])
def test_unusable_configs(config, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(config)


def region(kind, value, **extra):
    return {"type": kind, "from_name": "point" if kind.startswith("key") else "box", "to_name": "image",
            "original_width": 800, "original_height": 600, "value": value, **extra}


def test_points_in_percent_become_pixels():
    schema = parse_config(SMART_CONFIG)
    prompt = parse_context({"result": [
        region("keypointlabels", {"x": 50, "y": 25, "keypointlabels": ["Object"]}),
        region("keypointlabels", {"x": 10, "y": 10}, is_positive=False),
    ]}, schema)
    assert prompt.points == [[400, 150], [80, 60]] and prompt.point_labels == [1, 0]
    assert (prompt.box, prompt.label, prompt.width, prompt.height) == (None, "Object", 800, 600)


def test_last_rectangle_wins_and_rotation_uses_the_bounding_box():
    schema = parse_config(SMART_CONFIG)
    prompt = parse_context({"result": [region("rectanglelabels", {"x": 0, "y": 0, "width": 10, "height": 10}),
                                       region("rectanglelabels", {"x": 10, "y": 20, "width": 50, "height": 50})]},
                           schema)
    assert prompt.box == [80, 120, 480, 420] and prompt.points is None
    rotated = parse_context({"result": [region("rectanglelabels", {"x": 50, "y": 10, "width": 10, "height": 10,
                                                                   "rotation": 90})]}, schema)
    assert rotated.box == pytest.approx([340, 60, 400, 140])


@pytest.mark.parametrize("context, message", [
    ({}, "non-empty list"),
    ({"result": [region("polygonlabels", {})]}, "unsupported region type"),
    ({"result": [dict(region("keypointlabels", {"x": 1, "y": 1}), from_name="other")]}, "not a KeyPointLabels"),
    ({"result": [region("keypointlabels", {"x": "a", "y": 1})]}, "finite number"),
    ({"result": [region("keypointlabels", {"x": 101, "y": 1})]}, "outside the image"),
    ({"result": [region("rectanglelabels", {"x": 120, "y": 1, "width": 5, "height": 5})]}, "outside the image"),
    ({"result": [dict(region("keypointlabels", {"x": 1, "y": 1}), original_width=0)]}, "positive"),
])
def test_bad_contexts(context, message):
    with pytest.raises(PromptError, match=message):
        parse_context(context, parse_config(SMART_CONFIG))


def test_job_json_round_trip_and_validation():
    job = SegmentJob("/data/upload/1/a.jpg", "url:abc", points=[[1.5, 2.0]], point_labels=[1], reference_size=[8, 6])
    assert SegmentJob.from_dict(job.to_dict()) == job
    assert SegmentJob.from_dict({"image_url": "u", "image_key": "k", "prewarm_only": True}).prewarm_only
    for bad in ({"image_url": "u", "image_key": "k"}, {"image_url": "u", "image_key": "k", "box": [1, 2]},
                {"image_url": "u", "image_key": "k", "points": [[1, 2]], "point_labels": []},
                {"image_url": "u", "image_key": "k", "colour": 1}, ["not", "a", "dict"]):
        with pytest.raises(JobError):
            SegmentJob.from_dict(bad)
    points, labels, box = SegmentJob("u", "k", points=[[4, 3]], point_labels=[1], box=[0, 0, 8, 6],
                                     reference_size=[8, 6]).scaled_prompts(16, 12)
    assert points.tolist() == [[8, 6]] and box.tolist() == [0, 0, 16, 12]
