"""Open a card for use: the one entry point the CLI, the app and the harness call.

:func:`open_card` resolves a card (a built-in id, a card file or a release folder,
:func:`nla_space.cards.find_card`) and hands it to the opener of its kind in :data:`CARD_KINDS`:
a learned soft prefix (:mod:`nla_space.verbalizers.prefix_card`), a token-injection AV scored by a
reconstructor (:mod:`nla_space.verbalizers.injection`) or a residual-patch AV
(:mod:`nla_space.verbalizers.patch_card`). Every opened card is an
:class:`~nla_space.verbalizers.base.OpenedCard`, the one declared interface (text → activation → K
samples → re-encode → score → best, hedged); adding a kind is its own module plus one line in
:data:`CARD_KINDS` (:mod:`nla_space.verbalizers.base`). This module sits above the openers and imports
them; none of them imports it.
"""

from __future__ import annotations

from typing import Protocol

from .cards import Card, find_card
from .errors import NLAInputError
from .verbalizers.base import OpenedCard
from .verbalizers.injection import OpenInjectionCard, open_injection_card
from .verbalizers.patch_card import OpenPatchCard, open_patch_card
from .verbalizers.prefix_card import OpenCard, open_prefix_card

__all__ = ["CARD_KINDS", "CardOpener", "OpenCard", "OpenInjectionCard", "OpenPatchCard", "OpenedCard", "open_card"]


class CardOpener(Protocol):
    """What opens one card kind (see :func:`open_card` for the arguments)."""

    def __call__(
        self, card: Card, backbone: str | None = None, device: str | None = None, revision: str | None = None,
        dtype: str | None = None,
    ) -> OpenedCard: ...


#: card kind → the function that opens it
CARD_KINDS: dict[str, CardOpener] = {
    "prefix": open_prefix_card,
    "injection": open_injection_card,
    "patch": open_patch_card,
}


def open_card(
    card: str | Card | None = None,
    backbone: str | None = None,
    device: str | None = None,
    revision: str | None = None,
    dtype: str | None = None,
) -> OpenedCard:
    """Open a card: resolve it, then load (or share) its backbone, build and load its AV, read its μ.

    ``backbone``/``revision`` replace the card's backbone. ``dtype`` is the user's explicit compute
    dtype (``--dtype``/``NLA_CPU_DTYPE``); without it the backbone runs in float32 on CPU and in the
    card's ``backbone.dtype`` on CUDA. AVs and scores stay float32 either way."""
    card = card if isinstance(card, Card) else find_card(card)
    opener = CARD_KINDS.get(card.kind)
    if opener is None:
        raise NLAInputError(f"card {card.id}: kind {card.kind!r} is not supported by this version (kinds: {', '.join(CARD_KINDS)})")
    return opener(card, backbone=backbone, device=device, revision=revision, dtype=dtype)
