"""Export a registered model to every ONNX candidate, gate them, benchmark them, register the result.

    ray job submit --working-dir . -- python jobs/export.py --model digits@latest --quantize int8
    ... jobs/export.py --model digits@1 --student digits-pruned@1 --student digits-distilled@1

Runs in the job's driver (export is a single-process CPU step); the registry root comes
from --root or MLPLATFORM_REGISTRY_ROOT.
"""

import argparse
import sys

from mlplatform.errors import PlatformError
from mlplatform.export import export_model, format_report, make_spec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="registry ref: NAME, NAME@VERSION or NAME@ALIAS")
    p.add_argument("--quantize", choices=["int8", "none"], help="override the spec's `quantize`")
    p.add_argument("--config", help="ExportSpec YAML, e.g. jobs/configs/export-digits.yaml")
    p.add_argument("--root", help="registry root (default: MLPLATFORM_REGISTRY_ROOT)")
    p.add_argument("--classification", help="keep or raise the source version's classification (never lower)")
    p.add_argument("--student", action="append", default=[], metavar="REF",
                   help="a compressed student of --model to export beside it (jobs/compress.py registers them); repeatable")
    a = p.parse_args()
    try:
        spec = make_spec(a.config, quantize=a.quantize, classification=a.classification, students=a.student)
        report = export_model(a.model, spec, root=a.root)
    except PlatformError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.passed else 1  # a failed student is reported, not fatal


if __name__ == "__main__":
    sys.exit(main())
