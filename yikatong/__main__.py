"""`python -m yikatong serve ...`: the same command line as the `yikatong` script."""
import sys

from yikatong.server.cli import main

sys.exit(main())
