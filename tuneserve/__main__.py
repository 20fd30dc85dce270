"""`python -m tuneserve ...` runs the command line."""

import sys

from tuneserve.cli.main import main

sys.exit(main())
