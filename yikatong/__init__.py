"""Yikatong: card transaction and state server. Domain rules live in this package;
`yikatong.v1` holds the protobuf/gRPC modules the build generates from proto/."""

# The one place the release is named: pyproject.toml reads it (setuptools' dynamic version),
# `yikatong --version` prints it, the start-up line logs it, a data dir records it
# (storage/migrate.py). 0.2.0: the first release that records its store format; 0.3.0: store
# format 4, holders' personal information sealed (issue 25); 0.4.0: store format 5, a hot store
# bounded by --retain-days and its archive (issue 26); 0.5.0: store format 6, smaller hot records
# (issue 26).
__version__ = "0.5.0"
