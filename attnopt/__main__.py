"""`python -m attnopt`: the CLI (cli.py)."""

import sys

from .cli import main

sys.exit(main())
