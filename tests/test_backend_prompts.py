"""Labeling configs (label_studio_sdk) and Label Studio contexts -> the objects of a click, in pixels."""

import pytest

from serving.jobs import JobError, ObjectJob, OutputSpec, SegmentJob
from serving.labels import SMART_CONFIG, ConfigError, Target, parse_config
from backend.prompts import PromptError, parse_context


def test_smart_config():
    schema = parse_config(SMART_CONFIG)
    assert (schema.image_name, schema.image_value) == ("image", "image")
    assert schema.prompts == {"point": "keypoint", "box": "rectangle"}
    assert schema.targets == (Target("mask", "brush", ("Object",)),)
    assert schema.labels_for(schema.targets, "Object") == {"mask": ["Object"]}
    assert schema.labels_for(schema.targets, "Other") == {"mask": ["Object"]}  # no target has it: the first


TARGETS = ('<View><Image name="img" value="$image"/>'
           '<BrushLabels name="brush" toName="img"><Label value="Cat"/><Label value="Dog"/></BrushLabels>'
           '<PolygonLabels name="outline" toName="img"><Label value="Dog"/><Label value="Tree"/></PolygonLabels>'
           '<RectangleLabels name="bbox" toName="img"><Label value="Dog"/></RectangleLabels>'
           '<RectangleLabels name="prompt_box" toName="img" smart="true"><Label value="Dog"/></RectangleLabels>'
           '<KeyPointLabels name="kp" toName="img" smart="true"><Label value="Dog"/><Label value="Cat"/>'
           '</KeyPointLabels></View>')


def test_every_target_kind_and_labels_by_name():
    schema = parse_config(TARGETS)
    assert schema.prompts == {"prompt_box": "rectangle", "kp": "keypoint"}  # a smart rectangle prompts
    assert [(t.name, t.kind) for t in schema.targets] == [("brush", "brush"), ("outline", "polygon"), ("bbox", "box")]
    assert schema.labels_for(schema.targets, "Dog") == {"brush": ["Dog"], "outline": ["Dog"], "bbox": ["Dog"]}
    assert schema.labels_for(schema.targets, "Cat") == {"brush": ["Cat"]}  # only the target that has it
    assert schema.labels_for(schema.targets, "Zebra") == {"brush": ["Cat"], "outline": ["Dog"], "bbox": ["Dog"]}
    assert [t.name for t in schema.select(("polygon", "bbox"))] == ["outline", "bbox"]
    with pytest.raises(ConfigError, match=r"matches none .*brush \(brush\), outline \(polygon\)"):
        schema.select(("mesh",))


def test_polygon_only_smart_config_is_usable():
    schema = parse_config('<View><Image name="image" value="$image"/>'
                          '<PolygonLabels name="poly" toName="image"><Label value="Object"/></PolygonLabels>'
                          '<KeyPointLabels name="point" toName="image" smart="true"><Label value="Object"/>'
                          '</KeyPointLabels></View>')
    assert schema.targets == (Target("poly", "polygon", ("Object",)),)


def test_keypoints_only_config_on_another_data_key():
    schema = parse_config('<View><Image name="img" value="$photo"/>'
                          '<BrushLabels name="b" toName="img"><Label value="car"/></BrushLabels>'
                          '<KeyPointLabels name="k" toName="img" smart="true"><Label value="car"/>'
                          '</KeyPointLabels></View>')
    assert (schema.image_value, schema.prompts) == ("photo", {"k": "keypoint"})


@pytest.mark.parametrize("config, message", [
    ("", "empty"),
    ("<View><Image", "not valid XML"),
    ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i" smart="true"><Label value="a"/>'
     '</RectangleLabels></View>', "a target for the masks"),
    ('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i"><Label value="a"/></BrushLabels>'
     '<RectangleLabels name="r" toName="i"><Label value="a"/></RectangleLabels></View>', "a prompt"),
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
    click = parse_context({"result": [
        region("keypointlabels", {"x": 50, "y": 25, "keypointlabels": ["Object"]}, id="a"),
        region("keypointlabels", {"x": 10, "y": 10}, is_positive=False, id="b"),
    ]}, schema)
    assert (click.width, click.height) == (800, 600) and len(click.objects) == 1
    [prompt] = click.objects
    assert prompt.points == [[400, 150], [80, 60]] and prompt.point_labels == [1, 0]
    assert (prompt.box, prompt.label) == (None, "Object")
    assert prompt.regions == ["k:a:400.0,150.0:1", "k:b:80.0,60.0:0"]


def test_one_rectangle_with_points_is_one_object_and_rotation_uses_the_bounding_box():
    schema = parse_config(SMART_CONFIG)
    click = parse_context({"result": [region("rectanglelabels", {"x": 10, "y": 20, "width": 50, "height": 50}),
                                      region("keypointlabels", {"x": 90, "y": 90}, is_positive=False)]}, schema)
    [prompt] = click.objects
    assert prompt.box == [80, 120, 480, 420] and prompt.points == [[720, 540]] and prompt.point_labels == [0]
    rotated = parse_context({"result": [region("rectanglelabels", {"x": 50, "y": 10, "width": 10, "height": 10,
                                                                   "rotation": 90})]}, schema)
    assert rotated.objects[0].box == pytest.approx([340, 60, 400, 140])


def test_several_rectangles_are_several_objects_with_their_points():
    schema = parse_config(SMART_CONFIG)
    click = parse_context({"result": [
        region("rectanglelabels", {"x": 0, "y": 0, "width": 50, "height": 50, "rectanglelabels": ["Object"]}),
        region("rectanglelabels", {"x": 10, "y": 10, "width": 10, "height": 10}),  # inside the first
        region("rectanglelabels", {"x": 60, "y": 60, "width": 30, "height": 30}),
        region("keypointlabels", {"x": 15, "y": 15}, is_positive=False),  # in the first two: the smaller one's
        region("keypointlabels", {"x": 70, "y": 70}),
        region("keypointlabels", {"x": 95, "y": 5}),  # in none: an object of its own
    ]}, schema)
    boxes = [o.box for o in click.objects]
    assert boxes == [[0, 0, 400, 300], [80, 60, 160, 120], [480, 360, 720, 540], None]
    assert [o.points for o in click.objects] == [None, [[120, 90]], [[560, 420]], [[760, 30]]]
    assert click.objects[0].label == "Object" and len(click.objects[1].regions) == 2
    alone = parse_context({"result": [region("rectanglelabels", {"x": 0, "y": 0, "width": 5, "height": 5}),
                                      region("rectanglelabels", {"x": 50, "y": 50, "width": 5, "height": 5}),
                                      region("keypointlabels", {"x": 95, "y": 5}, is_positive=False)]}, schema)
    assert len(alone.objects) == 2  # a negative point outside every rectangle selects nothing


@pytest.mark.parametrize("context, message", [
    ({}, "non-empty list"),
    ({"result": [region("polygonlabels", {})]}, "unsupported region type"),
    ({"result": [dict(region("keypointlabels", {"x": 1, "y": 1}), from_name="other")]}, "not a smart KeyPointLabels"),
    ({"result": [region("keypointlabels", {"x": "a", "y": 1})]}, "finite number"),
    ({"result": [region("keypointlabels", {"x": 101, "y": 1})]}, "outside the image"),
    ({"result": [region("rectanglelabels", {"x": 120, "y": 1, "width": 5, "height": 5})]}, "outside the image"),
    ({"result": [dict(region("keypointlabels", {"x": 1, "y": 1}), original_width=0)]}, "positive"),
])
def test_bad_contexts(context, message):
    with pytest.raises(PromptError, match=message):
        parse_context(context, parse_config(SMART_CONFIG))


def test_job_json_round_trip_and_validation():
    job = SegmentJob("/data/upload/1/a.jpg", "url:abc", [ObjectJob(points=[[1.5, 2.0]], point_labels=[1], key="k1"),
                                                         ObjectJob(box=[0, 0, 4, 4], refine="k0")],
                     reference_size=[8, 6], output=OutputSpec(polygon=True, min_area=5))
    assert SegmentJob.from_dict(job.to_dict()) == job
    assert SegmentJob.from_dict({"image_url": "u", "image_key": "k", "prewarm_only": True}).prewarm_only
    for bad in ({"image_url": "u", "image_key": "k"}, {"image_url": "u", "image_key": "k", "objects": [{"box": [1, 2]}]},
                {"image_url": "u", "image_key": "k", "objects": [{"points": [[1, 2]], "point_labels": []}]},
                {"image_url": "u", "image_key": "k", "objects": [{"box": [0, 0, 1, 1], "colour": 1}]},
                {"image_url": "u", "image_key": "k", "objects": [{"box": [0, 0, 1, 1]}], "output": {"mesh": True}},
                {"image_url": "u", "image_key": "k", "objects": [{"box": [0, 0, 1, 1]}] * 65},
                {"image_url": "u", "image_key": "k", "colour": 1}, ["not", "a", "dict"]):
        with pytest.raises(JobError):
            SegmentJob.from_dict(bad)
    item = ObjectJob(points=[[4, 3]], point_labels=[1], box=[0, 0, 8, 6])
    points, labels, box = SegmentJob("u", "k", [item], reference_size=[8, 6]).scaled_prompts(item, 16, 12)
    assert points.tolist() == [[8, 6]] and box.tolist() == [0, 0, 16, 12]
