"""What a training run learns from besides the corrections: every image of the corrected projects, listed
through Label Studio's API (a stand-in host here), fetched when the trainer reads it."""

from __future__ import annotations

import numpy as np

from e2e.servers import ImageHost
from serving.correction_stream import Correction
from serving.images import ImageFetcher
from serving.labels import SMART_CONFIG
from serving.labelstudio_api import LabelStudioClient
from serving.training import _project_samples, project_images, remote_sample
from samlight.image_io import load_image


def test_project_images_are_listed_page_by_page_and_fetched_lazily(coco_val_images):
    with ImageHost(coco_val_images[0].parent) as host:
        host.projects = {1: {"id": 1, "label_config": SMART_CONFIG}, 2: {"id": 2, "label_config": "<View/>"}}
        names = [p.name for p in coco_val_images[:5]]
        host.tasks = [{"id": 10 + i, "project": 1, "data": {"image": f"/data/upload/{names[i % 5]}"}}
                      for i in range(230)]
        host.tasks[3]["data"]["image"] = "s3://photos/" + names[0]  # synced from cloud storage
        host.tasks.append({"id": 999, "project": 2, "data": {"image": "/data/upload/x.jpg"}})
        fetcher = ImageFetcher(host.url, api_key=host.legacy_token)
        client = LabelStudioClient(fetcher)

        listed = project_images(client, {1, 2}, limit=1000)
        assert [task for task, _ in listed] == [t["id"] for t in host.tasks[:230]]  # 3 pages; project 2: no image
        assert listed[3][1].startswith("/tasks/13/presign/?fileuri=")
        assert len(project_images(client, {1}, limit=120)) == 120

        sample = remote_sample(listed[0][1], fetcher)
        before = len(host.requests)
        assert sample.key == fetcher.image_key(listed[0][1]) and len(host.requests) == before  # nothing fetched yet
        assert np.array_equal(sample.load_image(), load_image(coco_val_images[0]))
        assert remote_sample("/data/upload/gone.jpg", fetcher).load_image().shape == (64, 64, 3)  # a blank stands in

        # the corrected tasks themselves are not repeated; the held-out share is stable
        corrections = [Correction(annotation_id="a1", task_id=10, updated_at="t", image=None, result=[], project=1)]
        train, held = _project_samples(corrections, fetcher, 1000, 0.2)
        again_train, again_held = _project_samples(corrections, fetcher, 1000, 0.2)
        assert len(train) + len(held) == 229 and 0 < len(held) < 100
        assert [s.key for s in held] == [s.key for s in again_held]
        assert _project_samples(corrections, ImageFetcher(), 1000, 0.2) == ([], [])  # no Label Studio API
