"""Prune and distill a registered classifier; gate each result and register it with lineage to its teacher.

    ray job submit --working-dir . -- python jobs/compress.py --model digits@1 --config jobs/configs/compress-digits.yaml

The work runs in a Ray task inside the teacher's regions; the registry root comes from --root or
MLPLATFORM_REGISTRY_ROOT. Exit 1 when a result failed its gate (it is then not registered).
"""

import argparse
import sys

from mlplatform import config
from mlplatform.compress import CompressSpec, compress_model, format_report
from mlplatform.errors import PlatformError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="teacher registry ref: NAME, NAME@VERSION or NAME@ALIAS")
    p.add_argument("--config", help="CompressSpec YAML, e.g. jobs/configs/compress-digits.yaml")
    p.add_argument("--root", help="registry root (default: MLPLATFORM_REGISTRY_ROOT)")
    a = p.parse_args()
    try:
        spec = config.load(a.config, CompressSpec) if a.config else CompressSpec()
        report = compress_model(a.model, spec, root=a.root)
    except PlatformError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
