"""`python -m testbed.cli` is `sledge`."""

import sys

from testbed.cli.main import main

sys.exit(main())
