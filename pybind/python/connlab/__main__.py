"""`python -m connlab` runs the command line."""

import sys

from connlab._cli import main

sys.exit(main())
