"""ImageFetcher against real local HTTP servers: Label Studio URLs, tokens, limits and clear errors."""

import numpy as np
import pytest
from PIL import Image

from backend.images import FetchError, ImageFetcher
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


def test_token_is_sent_only_to_label_studio(host, image_dir):
    with ImageHost(image_dir) as other:
        fetcher = ImageFetcher(host.url, api_key=host.legacy_token)
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
    with pytest.raises(FetchError, match="cannot connect to http://127.0.0.1:1"):
        ImageFetcher().fetch("http://127.0.0.1:1/x.jpg")


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
