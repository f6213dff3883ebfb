"""The few Label Studio API calls the backend makes itself: posting predictions finished in the background.

Requests go only to ``LABEL_STUDIO_URL`` (paths, never URLs, are accepted), through the image fetcher's
guarded session and with its token handling (a personal access token is exchanged and refreshed), so the
token rules are the fetcher's: the key is sent to the Label Studio origin and nowhere else.
"""

from __future__ import annotations

import requests

from serving import labelstudio
from serving.errors import StatusError
from serving.images import ImageFetcher


class LabelStudioApiError(StatusError):
    default_status = 502


class LabelStudioClient:
    def __init__(self, fetcher: ImageFetcher, timeout_s: float = 30.0) -> None:
        if not fetcher.label_studio_url or fetcher.auth is None:
            raise LabelStudioApiError("the Label Studio API needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", 400)
        self.base_url = fetcher.label_studio_url
        self.session = fetcher.session
        self.auth = fetcher.auth
        self.timeout_s = timeout_s

    @staticmethod
    def available(fetcher: ImageFetcher) -> bool:
        return bool(fetcher.label_studio_url) and fetcher.auth is not None

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        if not path.startswith("/api/"):
            raise ValueError(f"not a Label Studio API path: {path!r}")
        url = self.base_url + path
        try:
            response = self._send(method, url, **kwargs)
            if response.status_code == 401 and self.auth.is_personal_token:  # revoked early: one fresh token
                response = self._send(method, url, force_refresh=True, **kwargs)
        except requests.RequestException as error:
            raise LabelStudioApiError(f"cannot reach Label Studio at {url}: {error}") from None
        if response.status_code >= 400:
            raise LabelStudioApiError(f"Label Studio answered {method} {path} with HTTP {response.status_code}: "
                                      f"{response.text[:300]}", 502 if response.status_code >= 500 else 400)
        return response

    def _send(self, method: str, url: str, force_refresh: bool = False, headers: dict | None = None,
              **kwargs) -> requests.Response:
        return self.session.request(method, url, headers={**(headers or {}), **self.auth.header(force_refresh)},
                                    allow_redirects=False, timeout=self.timeout_s, **kwargs)

    def prediction_versions(self, task_id: int) -> set[str]:
        """The model versions of the task's predictions."""
        body = self.request("GET", "/api/predictions/", params={"task": task_id}).json()
        items = body.get("results", []) if isinstance(body, dict) else body
        return {str(p.get("model_version")) for p in items if isinstance(p, dict)}

    def post_prediction(self, task_id: int, prediction: dict) -> dict:
        body = labelstudio.dumps({"task": task_id, **prediction})  # brush RLE is written straight into the JSON
        return self.request("POST", "/api/predictions/", data=body,
                            headers={"Content-Type": "application/json"}).json()
