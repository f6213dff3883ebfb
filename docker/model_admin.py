#!/usr/bin/env python3
"""Model versions by hand: list them, import a student checkpoint, activate (or roll back to) a version.

    python /app/docker/model_admin.py list
    python /app/docker/model_admin.py import /models/incoming/my-student [--activate]
    python /app/docker/model_admin.py activate lightening_t-20261124-101500

Runs where the workers run (`docker compose exec trainer python /app/docker/model_admin.py ...`): it uses
the same registry as the DLD job (MODEL_DIR/versions, the active version in Redis at REDIS_URL).
Activating verifies the weights' sha256 first, then the workers hot-reload it without a restart.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every version (JSON), the active one marked")
    imp = sub.add_parser("import", help="copy a student checkpoint directory (model.safetensors + config.json) in")
    imp.add_argument("directory")
    imp.add_argument("--activate", action="store_true", help="and make it the active version")
    act = sub.add_parser("activate", help="make a version active (also how to roll back)")
    act.add_argument("version")
    args = parser.parse_args(argv)

    from serving.registry import ModelRegistry, RegistryError
    from serving.config import Settings, connect

    settings = Settings.from_env().rq
    registry = ModelRegistry(settings.model_dir, connect(settings.redis_url), settings.keys)
    try:
        if args.action == "list":
            print(json.dumps(registry.describe(), indent=2, sort_keys=True))
        elif args.action == "import":
            record = registry.import_checkpoint(args.directory, parent=registry.active(), source="manual import")
            print(f"imported {args.directory} as {record.version} (sha256 {record.sha256})")
            if args.activate:
                registry.activate(record.version)
                print(f"active: {record.version}")
        else:
            previous = registry.active()
            registry.activate(args.version)
            print(f"active: {args.version} (was {previous})")
    except (RegistryError, ValueError, OSError) as error:  # CheckpointError is a ValueError
        print(f"model_admin: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
