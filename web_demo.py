"""Chat with a DeepSeek-VL2 model in the browser (Gradio 6); ``python web_demo.py --help``.

    python web_demo.py --model_name deepseek-ai/deepseek-vl2-tiny
    python web_demo.py --demo            # a built-in tiny checkpoint with random weights, no download

The same program as ``python -m deepseek_vl2.web`` (code in ``deepseek_vl2/web/demo.py``).
"""

import sys

from deepseek_vl2.web.demo import main

if __name__ == "__main__":
    sys.exit(main())
