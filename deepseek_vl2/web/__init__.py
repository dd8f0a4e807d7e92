"""The web demo's parts: ``context`` and ``session`` need only the library; ``app`` needs Gradio 6."""
