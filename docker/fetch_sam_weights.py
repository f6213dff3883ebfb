#!/usr/bin/env python3
"""Download an official SAM checkpoint (the DLD teacher) and verify it before it is used.

    python3 docker/fetch_sam_weights.py vit_h --dest models/weights
    docker compose run --rm --no-deps trainer python /app/docker/fetch_sam_weights.py vit_h

The file is written to DEST/<official name> only after its sha256 matches (from --sha256, from
--checksums FILE in `sha256sum` format, or from docker/sam-checkpoints.sha256 next to this script) and
the md5 prefix in Meta's file name matches; a mismatch leaves nothing behind and exits 1.
Weights are never baked into an image: in the GPU image DEST defaults to /models/weights, on the
`models` volume (so every worker host that shares the models folder sees them).
Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
FILES = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_b": "sam_vit_b_01ec64.pth"}
DEFAULT_CHECKSUMS = Path(__file__).with_name("sam-checkpoints.sha256")
CHUNK = 1 << 20


class FetchError(Exception):
    pass


def read_checksums(path: Path) -> dict[str, str]:
    """`sha256sum` format: '<64 hex>  <file name>' per line, '#' comments."""
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise FetchError(f"{path}:{number}: expected '<sha256>  <file name>', got {line!r}")
        table[parts[1].lstrip("*")] = parts[0].lower()
    return table


def md5_prefix(file_name: str) -> str | None:
    """Meta's names end in the first 6 hex digits of the file's md5: sam_vit_h_4b8939.pth -> 4b8939."""
    stem = Path(file_name).stem.rsplit("_", 1)[-1]
    return stem if len(stem) == 6 and all(c in "0123456789abcdef" for c in stem) else None


def fetch(url: str, dest: Path, sha256: str, md5_start: str | None, timeout: float = 60.0) -> Path:
    """Stream `url` to a temporary file in dest's folder, verify, then rename into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324 (md5 only to match Meta's file name)
    handle, temp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                md5.update(chunk)
                done += len(chunk)
                if total and done % (256 * CHUNK) < len(chunk):
                    print(f"  {done / 2**20:.0f} / {total / 2**20:.0f} MiB", file=sys.stderr)
        if digest.hexdigest() != sha256:
            raise FetchError(f"sha256 mismatch for {url}: got {digest.hexdigest()}, expected {sha256}")
        if md5_start is not None and not md5.hexdigest().startswith(md5_start):
            raise FetchError(f"md5 {md5.hexdigest()} does not start with {md5_start} (from the file name)")
        os.chmod(temp, 0o644)
        os.replace(temp, dest)
        return dest
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(FILES), help="which SAM checkpoint")
    parser.add_argument("--dest", type=Path, default=Path(os.environ.get("SAMLIGHT_WEIGHTS_DIR", "weights")))
    parser.add_argument("--sha256", help="expected sha256 (overrides the checksum file)")
    parser.add_argument("--checksums", type=Path, default=DEFAULT_CHECKSUMS, help="sha256sum-format file")
    parser.add_argument("--base-url", default=BASE_URL, help="mirror of Meta's folder (same file names)")
    parser.add_argument("--force", action="store_true", help="download again even if a verified file exists")
    args = parser.parse_args(argv)

    name = FILES[args.model]
    target = args.dest / name
    try:
        expected = (args.sha256 or read_checksums(args.checksums).get(name) or "").lower()
        if len(expected) != 64:
            raise FetchError(f"no sha256 for {name}: pass --sha256 or a --checksums file that lists it")
        if target.exists() and not args.force:
            if sha256_of(target) == expected:
                print(f"{target} already present and verified")
                return 0
            raise FetchError(f"{target} exists but its sha256 differs; remove it or pass --force")
        url = args.base_url.rstrip("/") + "/" + name
        print(f"downloading {url} -> {target}", file=sys.stderr)
        fetch(url, target, expected, md5_prefix(name))
    except (FetchError, OSError) as error:
        print(f"fetch_sam_weights: error: {error}", file=sys.stderr)
        return 1
    print(f"{target} verified (sha256 {expected})")
    print(f"teacher spec: {args.model}:{target}")
    return 0


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
