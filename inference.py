"""Ask a DeepSeek-VL2 model about images from the command line; ``python inference.py --help``.

The same program is installed as the ``deepseek-vl2`` console script.
"""

import sys

from deepseek_vl2.cli import main

if __name__ == "__main__":
    sys.exit(main())
