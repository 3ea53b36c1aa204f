"""`python -m mdf_taxonomy.cli`, the console script's module form."""

import sys

from mdf_taxonomy.cli import main

sys.exit(main())
