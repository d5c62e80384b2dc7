"""`python -m flashmoe`: see flashmoe.cli."""

import sys

from .cli import main

sys.exit(main())
