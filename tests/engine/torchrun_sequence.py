"""Run several ``emamba train`` argument lists one after another in the same torchrun processes.

``python -m torch.distributed.run --nproc_per_node=N tests/engine/torchrun_sequence.py '[[args...], ...]'``:
the process group is set up once (by the first run) and reused, so a test of several distributed runs
pays the interpreter, import and rendezvous start-up once. Stops at the first run that does not exit 0.
"""

import json
import sys

from emamba import train
from emamba.engine.classification import cleanup_distributed


def main() -> int:
    try:
        for argv in json.loads(sys.argv[1]):
            code = train.run(train.parse_args(argv))
            if code:
                print(f"run {argv} exited with {code}", file=sys.stderr)
                return code
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
