"""``python -m deepseek_vl2.cli`` is the ``deepseek-vl2`` command."""

import sys

from . import main

sys.exit(main())
