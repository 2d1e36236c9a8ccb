"""Run a cost-aware hyperparameter search from a TuneSpec YAML on the Ray cluster this job runs in.

    mlplatform tune plan --config jobs/configs/tune-digits.yaml      # placement and cost forecast first
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune-digits.yaml

Results (trials.json, pareto.md, pareto.png, best.json) go to <storage_path>/<name>/results;
`mlplatform cost report --job JOB_ID --by trial` shows what each trial cost.
"""

import argparse
import sys

from mlplatform import config
from mlplatform.errors import PlatformError
from mlplatform.tune import TuneSpec, tune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TuneSpec YAML, e.g. jobs/configs/tune-digits.yaml")
    parser.add_argument("--name", help="experiment name instead of the spec's `name`")
    args = parser.parse_args(argv)
    try:
        spec = config.load(args.config, TuneSpec)
        if args.name:
            spec = config.validate({**spec.model_dump(mode="json", by_alias=True), "name": args.name}, TuneSpec, "--name")
        result = tune(spec, args.config)
    except PlatformError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
