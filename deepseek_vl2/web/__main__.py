"""``python -m deepseek_vl2.web``: the web demo (``--help`` for its flags)."""

import sys

from .demo import main

sys.exit(main())
