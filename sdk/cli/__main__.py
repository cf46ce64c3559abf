"""``python -m shallowmark.cli``: the same as the ``shallowmark`` command."""

import sys

from shallowmark.cli import main

sys.exit(main())
