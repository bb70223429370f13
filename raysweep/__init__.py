"""raysweep: intrinsic dimension of token-embedding matrices, swept on Ray."""

__version__ = "0.1.0"

# Version of the estimator's arithmetic. It is part of every cell key, so a
# change that alters computed numbers must bump it to invalidate old cells.
ESTIMATOR_VERSION = "1"
