"""Train a model from a TrainSpec YAML on the Ray cluster this job runs in.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/digits.yaml [--name RUN]

Submitting a run name again resumes its newest complete checkpoint; `--name` starts a
fresh run of the same spec under another name.
"""

import argparse
import sys

from mlplatform import config
from mlplatform.errors import PlatformError
from mlplatform.train import TrainSpec, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TrainSpec YAML, e.g. jobs/configs/digits.yaml")
    parser.add_argument("--name", help="run name instead of the spec's `name` (a new name trains from scratch)")
    args = parser.parse_args(argv)
    try:
        spec = config.load(args.config, TrainSpec)
        if args.name:
            spec = config.validate({**spec.model_dump(mode="json"), "name": args.name}, TrainSpec, "--name")
        result = train(spec)
    except PlatformError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
