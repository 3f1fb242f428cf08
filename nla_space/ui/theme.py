"""Theme, CSS and the presentation-mode script. System fonts only: nothing is fetched from outside."""

from __future__ import annotations

from typing import Any

SYSTEM_SANS = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"]
SYSTEM_MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]


def theme() -> Any:
    import gradio as gr

    # Plain font names (strings) never trigger a download, unlike gr.themes.GoogleFont.
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="purple", font=SYSTEM_SANS, font_mono=SYSTEM_MONO)


CSS = """
.gradio-container { max-width: 1400px !important; margin: 0 auto; }
.dark .gradio-container { color: var(--body-text-color); }
.nla-badges { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin: .25rem 0; }
.nla-badge { display: inline-block; padding: .25rem .75rem; border-radius: 999px; font-weight: 700;
             letter-spacing: .05em; font-size: .95rem; color: #fff; }
.nla-confident { background: #059669; }
.nla-hedged { background: #d97706; }
.nla-untrained { background: #dc2626; }
.nla-score { font-size: .95rem; }
#best textarea { font-size: 1.15rem; font-weight: 600; }
/* Presentation mode (?present=1): large type, minimal chrome. */
body.nla-present .gradio-container { max-width: 100% !important; font-size: 1.35rem; }
body.nla-present footer, body.nla-present .nla-chrome { display: none !important; }
body.nla-present #best textarea { font-size: 2rem; line-height: 1.3; }
body.nla-present #input-text textarea { font-size: 1.5rem; }
body.nla-present .nla-badge { font-size: 1.4rem; padding: .4rem 1.1rem; }
body.nla-present .nla-score { font-size: 1.3rem; }
body.nla-present button { font-size: 1.2rem !important; }
body.nla-present label span, body.nla-present .label-wrap span { font-size: 1.1rem; }
"""

#: Runs on page load: ``?present=1`` (or ``true``/``yes``) adds the ``nla-present`` class to <body>.
PRESENT_JS = """
() => {
  const v = (new URLSearchParams(window.location.search).get('present') || '').toLowerCase();
  if (['1', 'true', 'yes', 'on'].includes(v)) { document.body.classList.add('nla-present'); }
}
"""


def is_present(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}
