"""The Gradio app (the only place in nla_space that imports Gradio).

``build_demo()`` → the Blocks; ``launch_kwargs()`` → what ``demo.launch`` takes; ``preload()`` opens
the default card(s) at module level (as ZeroGPU wants). See docs/app.md.
"""

from __future__ import annotations

from .app import api_sweep, api_verbalize, build_demo, launch_kwargs
from .engine import preload

__all__ = ["api_sweep", "api_verbalize", "build_demo", "launch_kwargs", "preload"]
