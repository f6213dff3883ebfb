"""Fetching task images the way Label Studio serves them.

``task_image_url(url, task_id)`` is the one rule for a task's image: a cloud-storage URI (``s3://``, ``gs://``,
``azure-blob://``, any scheme a Label Studio storage produces) becomes Label Studio's presign endpoint for that
task, which redirects to a presigned URL (or proxies the bytes when the storage does not presign).
``ImageFetcher.fetch(url)`` resolves relative ``/data/upload/...``, ``/data/local-files/...`` and presign URLs
against ``LABEL_STUDIO_URL``, downloads with a byte limit and one wall-clock deadline for the whole fetch (redirects
and a trickling server included), and decodes (EXIF-corrected RGB, pixel and aspect limits).

The Label Studio API key is sent only to the Label Studio origin, decided on the URL exactly as the HTTP client
connects to it (URLs with user info or backslashes are refused), and never on a redirect. Connections go only
to the Label Studio origin, public addresses and ``SAMLIGHT_FETCH_ALLOW`` (``serving.outbound``). A personal
access token (a JWT refresh token) is exchanged at ``/api/token/refresh/`` for a short-lived access token that
is refreshed before it expires; a legacy token is sent as ``Token <key>``. A failed fetch is remembered for a
few seconds, so a prewarm and the clicks that follow it do not download a failing image again and again.

Every failure raises :class:`FetchError` with an HTTP status for the backend's answer and a message that says
what went wrong (not found, refused, timed out, not an image, too large).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import re
import time
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import numpy as np
import requests
import urllib3

from serving.config import FetchSettings
from serving.errors import StatusError
from serving.outbound import GuardedSession, OutboundPolicy, origin
from samlight.image_io import ImageError, ImageLimits, decode_image

log = logging.getLogger(__name__)


class FetchError(StatusError):
    """An image could not be fetched or decoded; ``status`` is the HTTP status the backend answers with."""

    default_status = 502


# schemes fetched directly, or refused with their own message; any other ``scheme://`` is a storage URI
_DIRECT_SCHEMES = ("http", "https", "data", "file", "")
_PRESIGN_PATH = re.compile(r"^/tasks/(\d+)/(?:presign|resolve)/$")


def task_image_url(url: str, task_id: object) -> str:
    """The URL to fetch for a task's image: a cloud-storage URI becomes ``/tasks/<id>/presign/?fileuri=...``
    (relative to Label Studio, like an upload), anything else is returned as it is."""
    if not isinstance(url, str) or "://" not in url or urlsplit(url.strip()).scheme.lower() in _DIRECT_SCHEMES:
        return url
    if isinstance(task_id, bool) or not isinstance(task_id, int) and not (isinstance(task_id, str) and task_id.isdigit()):
        raise FetchError(f"the image {url} is in cloud storage: Label Studio can presign it only for a task, "
                         "and this one has no id", 400)
    fileuri = base64.urlsafe_b64encode(url.strip().encode()).decode()
    return f"/tasks/{int(task_id)}/presign/?fileuri={quote(fileuri)}"


def storage_uri(url: str) -> tuple[str, str] | None:
    """(task id, storage URI) of a Label Studio presign URL, None for any other URL."""
    parts = urlsplit(url)
    match = _PRESIGN_PATH.match(parts.path)
    fileuri = parse_qs(parts.query).get("fileuri")
    if not match or not fileuri:
        return None
    try:
        return match.group(1), base64.urlsafe_b64decode(fileuri[0].encode()).decode()
    except (ValueError, UnicodeDecodeError):
        return match.group(1), fileuri[0]


def _jwt_claims(token: str) -> dict | None:
    """The payload of a JWT (unverified: we only read its expiry and type), or None for a legacy token."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, json.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth:
    """The Authorization header for Label Studio, refreshing a personal access token before it expires."""

    REFRESH_MARGIN_S = 30.0

    def __init__(self, base_url: str, api_key: str, session: requests.Session, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key.strip()
        self.session = session
        self.timeout = timeout
        claims = _jwt_claims(self.api_key)
        self.is_personal_token = claims is not None and claims.get("token_type") == "refresh"
        self._access: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()

    def header(self, force_refresh: bool = False) -> dict[str, str]:
        if not self.is_personal_token:
            scheme = "Bearer" if _jwt_claims(self.api_key) else "Token"
            return {"Authorization": f"{scheme} {self.api_key}"}
        with self._lock:
            if force_refresh or self._access is None or time.time() > self._expires_at - self.REFRESH_MARGIN_S:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh(self) -> None:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            response = self.session.post(url, json={"refresh": self.api_key}, timeout=self.timeout)
        except requests.RequestException as error:
            raise FetchError(f"cannot reach Label Studio at {url} to refresh the API token ({error})", 502) from None
        if response.status_code != 200:
            raise FetchError(
                f"Label Studio refused the personal access token (HTTP {response.status_code} from {url}): "
                "check LABEL_STUDIO_API_KEY", 502)
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise FetchError(f"{url} answered without an access token", 502) from None
        claims = _jwt_claims(access) or {}
        self._access = access
        # without an exp claim, refresh every minute
        self._expires_at = float(claims.get("exp", time.time() + 60))


def _limit_next_read(response: requests.Response, seconds: float) -> None:
    """Give the response's socket only ``seconds`` for its next read."""
    raw = response.raw
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is None:  # a closing connection: http.client handed the socket to the response's file object
        sock = getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(0.01, seconds))


class ImageFetcher:
    """URL -> (H, W, 3) uint8 RGB array. Thread-safe; one per process is enough."""

    CHUNK = 1 << 16
    MAX_REDIRECTS = 5
    REDIRECTS = (301, 302, 303, 307, 308)

    def __init__(self, label_studio_url: str | None = None, api_key: str | None = None,
                 limits: ImageLimits = ImageLimits(), timeout_s: float = 15.0,
                 session: requests.Session | None = None, allow: tuple[str, ...] = (),
                 failure_ttl_s: float = 10.0) -> None:
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        if self.label_studio_url:
            self._check_url(self.label_studio_url, what="LABEL_STUDIO_URL")
        self.limits = limits
        self.timeout_s = timeout_s
        self.session = session or GuardedSession(OutboundPolicy(self.label_studio_url, allow))
        self.auth = (LabelStudioAuth(self.label_studio_url, api_key, self.session, timeout_s)
                     if api_key and self.label_studio_url else None)
        self.failure_ttl_s = failure_ttl_s
        self._failures: dict[str, tuple[float, FetchError]] = {}
        self._failures_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: FetchSettings) -> "ImageFetcher":
        return cls(settings.label_studio_url, settings.api_key, settings.limits, settings.timeout_s,
                   allow=settings.allow, failure_ttl_s=settings.failure_ttl_s)

    # --- URLs -------------------------------------------------------------------------------------

    @staticmethod
    def _check_url(url: str, what: str = "the image URL") -> str:
        """``url`` as the HTTP client will send it; refuses what could connect somewhere other than it says."""
        if "\\" in url or any(ord(c) < 0x20 or ord(c) == 0x7f for c in url):
            raise FetchError(f"{what} {url!r} contains a backslash or a control character", 400)
        try:
            prepared = requests.Request("GET", url).prepare().url
        except requests.RequestException as error:
            raise FetchError(f"{what} {url!r} is not a valid URL: {error}", 400) from None
        scheme, host, _ = origin(prepared)
        if scheme not in ("http", "https") or not host:
            raise FetchError(f"{what} {url!r} must be an http(s) URL with a host", 400)
        if "@" in urlsplit(prepared).netloc:
            raise FetchError(f"{what} {url!r} must not contain user info (user@host)", 400)
        return prepared

    def resolve(self, url: str) -> str:
        """The absolute http(s) URL of a task's image reference, as it will be requested."""
        if not isinstance(url, str) or not url.strip():
            raise FetchError("the task has no image URL", 400)
        url = url.strip()
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return self._check_url(url)
        if url.startswith("//"):
            raise FetchError(f"scheme-relative image URL {url!r} is not supported: use http(s)://", 400)
        if scheme == "" and url.startswith("/"):
            if not self.label_studio_url and (stored := storage_uri(url)):
                raise FetchError(f"the image {stored[1]} is in cloud storage: set LABEL_STUDIO_URL and "
                                 "LABEL_STUDIO_API_KEY so that Label Studio can presign it for the backend", 400)
            if not self.label_studio_url:
                raise FetchError(f"the image URL {url} is relative to Label Studio: set LABEL_STUDIO_URL "
                                 "(and LABEL_STUDIO_API_KEY) for the backend", 400)
            return self._check_url(urljoin(self.label_studio_url + "/", url.lstrip("/")))
        if scheme == "data":
            raise FetchError("inline data: URLs are not supported; upload the image to Label Studio", 400)
        raise FetchError(f"unsupported image URL {url!r}: expected http(s), a Label Studio /data/ path, or a "
                         "cloud-storage URI of a task", 400)

    def image_key(self, url: str) -> str:
        """A stable cache key for an image URL (the same in every process and worker)."""
        resolved = self.resolve(url)
        return "url:" + hashlib.blake2b(resolved.encode(), digest_size=16).hexdigest()

    def _is_label_studio(self, url: str) -> bool:
        return self.label_studio_url is not None and origin(url) == origin(self.label_studio_url)

    # --- fetching ---------------------------------------------------------------------------------

    def fetch_bytes(self, url: str) -> bytes:
        resolved = self.resolve(url)
        with self._failures_lock:
            failed = self._failures.get(resolved)
        if failed is not None and failed[0] > time.monotonic():
            raise failed[1]
        try:
            return self._download(resolved)
        except FetchError as error:
            if error.status != 400:
                with self._failures_lock:
                    now = time.monotonic()
                    self._failures = {u: f for u, f in self._failures.items() if f[0] > now}
                    self._failures[resolved] = (now + self.failure_ttl_s, error)
            raise

    def fetch(self, url: str) -> np.ndarray:
        data = self.fetch_bytes(url)
        try:
            return decode_image(data, self.limits, name=url)
        except ImageError as error:
            raise FetchError(str(error), 422) from None

    def _download(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        to_label_studio = self._is_label_studio(url)
        presigned = storage_uri(url) if to_label_studio else None
        response = self._get(url, to_label_studio, deadline)
        if response.status_code in (401, 403) and to_label_studio and self.auth and self.auth.is_personal_token:
            response.close()  # the access token may have been revoked early: one fresh try
            response = self._get(url, to_label_studio, deadline, force_refresh=True)
        for _ in range(self.MAX_REDIRECTS):
            if response.status_code not in self.REDIRECTS or "Location" not in response.headers:
                break
            response.close()
            url = self._check_url(urljoin(url, response.headers["Location"]), what="the redirect")
            to_label_studio = False  # the token never follows a redirect
            response = self._get(url, to_label_studio, deadline)
        with response:
            if presigned is not None:
                self._check_presigned(response, url, to_label_studio, presigned)
            self._check_status(response, url, to_label_studio)
            return self._read_limited(response, url, deadline)

    def _get(self, url: str, to_label_studio: bool, deadline: float, force_refresh: bool = False) -> requests.Response:
        headers = {"Accept": "*/*"}  # Label Studio answers 406 to "Accept: image/*"
        if to_label_studio and self.auth is not None:
            headers.update(self.auth.header(force_refresh))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"timed out after {self.timeout_s:g}s fetching {url}", 504)
        try:
            return self.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                    timeout=(remaining, remaining))
        except (requests.ConnectionError, requests.ConnectTimeout) as error:
            # one answer for refused, unresolvable and unreachable targets; the log has the cause
            log.info("fetching %s failed: %s", url, error)
            parts = urlsplit(url)
            raise FetchError(f"cannot fetch {url}: {parts.scheme}://{parts.netloc} is not reachable or not an "
                             "allowed address (SAMLIGHT_FETCH_ALLOW)", 502) from None
        except requests.Timeout:
            raise FetchError(f"timed out after {self.timeout_s:g}s fetching {url}", 504) from None
        except requests.RequestException as error:
            raise FetchError(f"cannot fetch {url}: {error.__class__.__name__}: {error}", 502) from None

    @staticmethod
    def _check_presigned(response: requests.Response, url: str, from_label_studio: bool,
                         presigned: tuple[str, str]) -> None:
        """Errors of a cloud-storage image that name the storage problem rather than a URL nobody typed."""
        code = response.status_code
        if code == 200 or (from_label_studio and code in (401, 403)):  # 401/403 there: the token's message
            return
        task, uri = presigned
        if from_label_studio:
            raise FetchError(f"Label Studio could not presign {uri} for task {task} (HTTP {code}): no cloud storage "
                             "of the project holds it, or the storage cannot sign it; check the project's Cloud "
                             "Storage settings (bucket, prefix, credentials)", 502)
        where = urlsplit(url)
        raise FetchError(f"the cloud storage refused the presigned URL for {uri} (HTTP {code} from "
                         f"{where.scheme}://{where.netloc}): check the storage's credentials and presign TTL in "
                         "Label Studio", 502)

    def _check_status(self, response: requests.Response, url: str, to_label_studio: bool) -> None:
        code = response.status_code
        if code == 200:
            kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if kind.startswith("text/") or kind in ("application/json", "application/xml"):
                hint = " (a login page? check LABEL_STUDIO_API_KEY)" if to_label_studio else ""
                raise FetchError(f"{url} is not an image: the server sent {kind}{hint}", 422)
            return
        if code == 404:
            raise FetchError(f"image not found (HTTP 404): {url}", 502)
        if code in (401, 403):
            if to_label_studio:
                hint = ("set LABEL_STUDIO_API_KEY" if self.auth is None else "check LABEL_STUDIO_API_KEY")
                raise FetchError(f"Label Studio refused the image (HTTP {code}) at {url}: {hint}", 502)
            raise FetchError(f"the image server refused {url} (HTTP {code}); the Label Studio token is only "
                             "sent to LABEL_STUDIO_URL's host", 502)
        if code in self.REDIRECTS:
            raise FetchError(f"too many redirects fetching {url}", 502)
        raise FetchError(f"fetching {url} failed with HTTP {code}", 502)

    def _read_limited(self, response: requests.Response, url: str, deadline: float) -> bytes:
        limit = self.limits.max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise FetchError(f"{url}: {declared} bytes exceeds the limit of {limit}", 413)
        chunks, total = [], 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FetchError(f"timed out after {self.timeout_s:g}s reading {url}", 504)
                # one socket read (read1), allowed only the time left: a trickling or stalled server cannot
                # hold the fetch past its deadline
                _limit_next_read(response, remaining)
                chunk = response.raw.read1(self.CHUNK, decode_content=True)
                if not chunk:
                    break
                total += len(chunk)
                if total > limit:
                    raise FetchError(f"{url}: more than {limit} bytes (the limit)", 413)
                chunks.append(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            timed_out = "timed out" in str(error).lower()
            raise FetchError(f"reading {url} failed: {error}", 504 if timed_out else 502) from None
        return b"".join(chunks)
