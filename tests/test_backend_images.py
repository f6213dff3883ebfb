"""ImageFetcher against real local HTTP servers: Label Studio URLs, tokens, limits and clear errors."""

import re
import time

import numpy as np
import pytest
from PIL import Image

from serving.images import FetchError, ImageFetcher, storage_uri, task_image_url
from e2e.servers import ImageHost, make_jwt
from samlight.image_io import ImageLimits, load_image


@pytest.fixture
def image_dir(coco_val_images, tmp_path):
    # a real COCO photo, plus an EXIF-rotated copy (orientation 6: shown rotated 90 degrees clockwise)
    photo = coco_val_images[0]
    (tmp_path / "photo.jpg").write_bytes(photo.read_bytes())
    image = Image.open(photo)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif)
    return tmp_path


@pytest.fixture
def host(image_dir):
    with ImageHost(image_dir, personal_token=make_jwt({"token_type": "refresh"})) as server:
        yield server


def test_relative_upload_url_with_legacy_token(host, image_dir):
    fetcher = ImageFetcher(host.url, api_key=host.legacy_token)
    image = fetcher.fetch("/data/upload/photo.jpg")
    assert np.array_equal(image, load_image(image_dir / "photo.jpg"))
    assert host.requests[-1][2]["Authorization"] == f"Token {host.legacy_token}"


def test_exif_orientation_is_applied(host, image_dir):
    image = ImageFetcher(host.url, api_key=host.legacy_token).fetch("/data/upload/rotated.jpg")
    width, height = Image.open(image_dir / "photo.jpg").size
    assert image.shape == (width, height, 3)  # rotated: height and width swap


def test_personal_access_token_is_exchanged_and_refreshed(host):
    host.access_ttl = 20  # shorter than the refresh margin: every use refreshes
    fetcher = ImageFetcher(host.url, api_key=host.personal_token)
    assert fetcher.auth.is_personal_token
    fetcher.fetch(f"{host.url}/data/upload/photo.jpg")
    fetcher.fetch("/data/upload/photo.jpg")
    assert len(host.issued) == 2
    assert host.requests[-1][2]["Authorization"] == f"Bearer {host.issued[-1]}"


def test_personal_access_token_is_reused_while_valid(host):
    fetcher = ImageFetcher(host.url, api_key=host.personal_token)
    fetcher.fetch("/data/upload/photo.jpg")
    fetcher.fetch("/data/upload/photo.jpg")
    assert len(host.issued) == 1


LOOPBACK = ("127.0.0.1",)  # the test servers' address, refused unless allowed


def test_token_is_sent_only_to_label_studio(host, image_dir):
    with ImageHost(image_dir) as other:
        fetcher = ImageFetcher(host.url, api_key=host.legacy_token, allow=LOOPBACK)
        fetcher.fetch(f"{other.url}/files/photo.jpg")
        assert "Authorization" not in other.requests[-1][2]
        with pytest.raises(FetchError, match="only sent to LABEL_STUDIO_URL"):
            fetcher.fetch(f"{other.url}/data/upload/photo.jpg")


def test_clear_errors(host):
    fetcher = ImageFetcher(host.url, api_key=host.legacy_token, limits=ImageLimits(max_bytes=100_000),
                           timeout_s=1.0)
    cases = {
        "/data/upload/missing.jpg": (502, "not found"),
        "/text": (422, "not an image"),
        "/big": (413, "exceeds the limit"),
        "/slow": (504, "timed out"),
        "s3://bucket/x.jpg": (400, "unsupported image URL"),
        "": (400, "no image URL"),
    }
    for url, (status, message) in cases.items():
        with pytest.raises(FetchError, match=message) as info:
            fetcher.fetch(url)
        assert info.value.status == status, url
    with pytest.raises(FetchError, match="refused the image") as info:
        ImageFetcher(host.url, api_key="wrong").fetch("/data/upload/photo.jpg")
    with pytest.raises(FetchError, match="set LABEL_STUDIO_URL"):
        ImageFetcher().fetch("/data/upload/photo.jpg")
    with pytest.raises(FetchError, match="http://127.0.0.1:1 is not reachable"):
        ImageFetcher(allow=LOOPBACK).fetch("http://127.0.0.1:1/x.jpg")
    with pytest.raises(FetchError, match="scheme-relative") as info:
        fetcher.fetch("//example.com/x.jpg")
    assert info.value.status == 400


def test_cloud_storage_images_come_through_label_studios_presign_endpoint(host, image_dir):
    url = task_image_url("s3://photos/photo.jpg", 7)
    assert url.startswith("/tasks/7/presign/?fileuri=") and storage_uri(url) == ("7", "s3://photos/photo.jpg")
    for direct in ("https://example.com/a.jpg", "/data/upload/a.jpg", "/data/local-files/?d=a.jpg"):
        assert task_image_url(direct, 7) == direct
    fetcher = ImageFetcher(host.url, api_key=host.legacy_token)
    assert np.array_equal(fetcher.fetch(url), load_image(image_dir / "photo.jpg"))
    (_, presign, asked), (_, served, redirected) = host.requests[-2:]
    assert presign.startswith("/tasks/7/presign/") and asked["Authorization"] == f"Token {host.legacy_token}"
    assert served == "/files/photo.jpg" and "Authorization" not in redirected  # never on a redirect
    # failures name the storage problem, not a URL nobody typed
    with pytest.raises(FetchError, match=r"could not presign s3://other/photo.jpg for task 7 .*Cloud Storage"):
        fetcher.fetch(task_image_url("s3://other/photo.jpg", 7))
    with pytest.raises(FetchError, match="refused the image"):
        ImageFetcher(host.url, api_key="wrong").fetch(url)
    with pytest.raises(FetchError, match="in cloud storage: set LABEL_STUDIO_URL"):
        ImageFetcher().fetch(url)
    with pytest.raises(FetchError, match="has no id") as info:
        task_image_url("gs://photos/photo.jpg", None)
    assert info.value.status == 400


@pytest.mark.parametrize("template", [
    "http://{other}\\@{studio}/data/upload/photo.jpg",  # the client connects to {other}, urlsplit says {studio}
    "http://{other}\\\\@{studio}/data/upload/photo.jpg",
    "http://user:pass@{studio}/data/upload/photo.jpg",
    "http://{studio}@{other}/data/upload/photo.jpg",
    "http://{other}/x\\@{studio}/data/upload/photo.jpg",
])
def test_urls_that_could_misdirect_the_token_are_refused(host, image_dir, template):
    with ImageHost(image_dir, legacy_token=host.legacy_token) as other:
        fetcher = ImageFetcher(host.url, api_key=host.legacy_token, allow=LOOPBACK)
        url = template.format(other=other.url[len("http://"):], studio=host.url[len("http://"):])
        with pytest.raises(FetchError) as info:
            fetcher.fetch(url)
        assert info.value.status == 400 and ("backslash" in str(info.value) or "user info" in str(info.value))
        assert other.requests == [] and not any("Authorization" in h for _, _, h in host.requests)


def test_redirects_never_carry_the_token(host, image_dir):
    with ImageHost(image_dir, legacy_token=host.legacy_token) as other:
        fetcher = ImageFetcher(host.url, api_key=host.legacy_token, allow=LOOPBACK)
        # Label Studio redirects to another server: followed, without the token
        image = fetcher.fetch(f"/data/upload/redirect?to={other.url}/files/photo.jpg")
        assert np.array_equal(image, load_image(image_dir / "photo.jpg"))
        assert host.requests[-1][2]["Authorization"] == f"Token {host.legacy_token}"
        assert "Authorization" not in other.requests[-1][2]
        # not even back to Label Studio itself (whose upload then refuses the unauthenticated request)
        with pytest.raises(FetchError, match=r"refused .* \(HTTP 401\)"):
            fetcher.fetch(f"/data/upload/redirect?to={other.url}/redirect?to={host.url}/data/upload/photo.jpg")
        assert "Authorization" not in host.requests[-1][2]


def test_private_addresses_are_refused_like_unreachable_ones(host, image_dir):
    with ImageHost(image_dir) as other:
        fetcher = ImageFetcher(host.url, api_key=host.legacy_token)  # no allow-list: loopback is private
        errors = []
        for url in (f"{other.url}/files/photo.jpg", "http://127.0.0.1:1/x.jpg",
                    f"/data/upload/redirect?to={other.url}/files/photo.jpg"):
            with pytest.raises(FetchError) as info:
                fetcher.fetch(url)
            errors.append((info.value.status, re.sub(r"http://127\.0\.0\.1:\d+\S*", "URL", str(info.value))))
        assert other.requests == []
        assert len(set(errors)) == 1, errors  # the same answer: no port-scan oracle
        # the Label Studio origin itself is always allowed, even on loopback
        fetcher.fetch("/data/upload/photo.jpg")


def test_the_deadline_covers_the_whole_download(host):
    fetcher = ImageFetcher(host.url, api_key=host.legacy_token, timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out") as info:
        fetcher.fetch("/trickle")  # one byte every 0.2 s: every single read is quick
    assert info.value.status == 504
    assert time.monotonic() - start < 2.0  # the 1 s deadline, not the 60 s the server would take


def test_a_failed_image_is_not_fetched_again_at_once(host):
    fetcher = ImageFetcher(host.url, api_key=host.legacy_token, failure_ttl_s=30)
    for _ in range(3):
        with pytest.raises(FetchError, match="not found"):
            fetcher.fetch("/data/upload/missing.jpg")
    assert sum(path == "/data/upload/missing.jpg" for _, path, _ in host.requests) == 1


def test_pixel_limit_and_non_image_bytes(host, image_dir):
    (image_dir / "fake.jpg").write_bytes(b"this is not a jpeg")
    fetcher = ImageFetcher(host.url, api_key=host.legacy_token, limits=ImageLimits(max_pixels=1000))
    with pytest.raises(FetchError, match="pixels exceeds") as info:
        fetcher.fetch("/data/upload/photo.jpg")
    assert info.value.status == 422
    with pytest.raises(FetchError, match="not a decodable image"):
        fetcher.fetch("/data/upload/fake.jpg")


def test_image_key_is_stable_and_resolves_relative_urls(host):
    fetcher = ImageFetcher(host.url + "/", api_key=host.legacy_token)
    key = fetcher.image_key("/data/upload/photo.jpg")
    assert key == ImageFetcher(host.url).image_key(f"{host.url}/data/upload/photo.jpg")
    assert key != fetcher.image_key("/data/upload/rotated.jpg")
