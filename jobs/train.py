"""Train a model from a TrainSpec YAML on the Ray cluster this job runs in.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/digits.yaml
"""

import argparse
import sys

from mlplatform import config
from mlplatform.errors import PlatformError
from mlplatform.train import TrainSpec, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TrainSpec YAML, e.g. jobs/configs/digits.yaml")
    args = parser.parse_args(argv)
    try:
        result = train(config.load(args.config, TrainSpec))
    except PlatformError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
