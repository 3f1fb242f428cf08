"""nla-space: read a language model's hidden activation as a sentence.

Entry points: :func:`nla_space.runtime.open_card` (library), ``python -m nla_space`` (CLI),
``app.py`` (Gradio). Conventions live in :mod:`nla_space.activations` (layer, read position),
:mod:`nla_space.scoring` (scores) and :mod:`nla_space.reencode` (round trip).
"""

__version__ = "0.1.0"
