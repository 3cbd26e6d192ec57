"""`python -m study.report NAME`."""

import sys

from study.report import main

sys.exit(main())
