"""`python -m keras_dni.benchmarks`: the benchmark CLI (see `cli`)."""

import sys

from keras_dni.benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
