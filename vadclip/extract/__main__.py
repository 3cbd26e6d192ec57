"""`python -m vadclip.extract VIDEOS OUT ...`: the command line of `vadclip.extract.cli`."""

import sys

from vadclip.extract.cli import main

sys.exit(main())
