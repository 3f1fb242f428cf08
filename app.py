"""Entry point of the demo and of the Hugging Face Space: ``python app.py``.

``spaces`` is imported first (before torch): on a ZeroGPU Space that import patches torch; elsewhere
it is a no-op, and the app also runs without the package. Models are opened at module level onto
the device (CUDA on a GPU or ZeroGPU Space, else CPU); the GPU work runs in ``@spaces.GPU``
functions (nla_space/ui/engine.py). Host and port follow GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
"""

from __future__ import annotations

try:  # must precede torch: see docs/app.md, "Spaces"
    import spaces  # noqa: F401
except ImportError:  # not installed: fine off-Space
    spaces = None

import logging
import os

logging.basicConfig(level=os.environ.get("NLA_SPACE_LOG", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

from nla_space.ui import build_demo, launch_kwargs, preload  # noqa: E402

preload()  # module level: the embedded card (or NLA_SPACE_PRELOAD=card1,card2) onto the device
demo = build_demo()

if __name__ == "__main__":
    demo.launch(**launch_kwargs())
