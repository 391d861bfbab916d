"""`python -m connlab` runs the command line."""

import sys

from connlab.cli import main

sys.exit(main())
