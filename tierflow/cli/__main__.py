"""``python -m tierflow.cli``."""

import sys

from tierflow.cli.main import main

sys.exit(main())
