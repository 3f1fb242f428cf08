"""The layer/read-position convention: the truncated forward equals hidden_states[ℓ] of a full forward."""

from __future__ import annotations

import pytest
import torch

from nla_space import activations
from nla_space.errors import NLAInputError


def test_truncated_forward_matches_output_hidden_states(tiny_backbone):
    bb = tiny_backbone
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15], [2, 20, 21, 22, 0, 0, 0]])
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        full = bb.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in range(0, bb.num_layers):
        got = activations.hidden_at_layer(bb, layer, input_ids=ids, attention_mask=mask)
        for row in range(2):
            n = int(mask[row].sum())
            torch.testing.assert_close(got[row, :n], full[layer][row, :n], rtol=1e-5, atol=1e-5)


def test_truncated_view_shares_weights_and_leaves_model_intact(tiny_llama):
    bb = tiny_llama
    n_before = len(bb.model.model.layers)
    view = activations.truncated_decoder(bb, 2)
    assert len(view.layers) == 2 and len(bb.model.model.layers) == n_before
    assert view.layers[0] is bb.model.model.layers[0]
    assert not isinstance(bb.model.model.norm, torch.nn.Identity)


def test_read_position_is_last_valid_token():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert activations.read_last_valid(hidden, right)[:, 0].tolist() == [2.0, 7.0]
    assert activations.read_last_valid(hidden, left)[:, 0].tolist() == [3.0, 7.0]


def test_extract_prepends_bos_and_reads_last_token(tiny_llama):
    bb = tiny_llama
    v = activations.extract(bb, "the cat is red", layer=2)
    ids = [bb.bos_id] + bb.tokenizer("the cat is red", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = bb.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, -1]
    torch.testing.assert_close(v, ref.float())


def test_the_last_layer_is_the_last_blocks_output_before_the_final_norm(tiny_llama):
    """ℓ = num_layers is read (a forward hook on the last block, as the NLA releases' readers take block
    K = num_layers − 1), and it is not HF's last ``hidden_states`` entry, which is after the final norm."""
    bb = tiny_llama
    n = bb.num_layers
    ids = [bb.bos_id] + bb.tokenizer("the cat is red", add_special_tokens=False)["input_ids"]
    seen = []
    handle = activations.decoder_of(bb.model).layers[n - 1].register_forward_hook(
        lambda mod, args, out: seen.append((out[0] if isinstance(out, tuple) else out)[0, -1].float()))
    try:
        with torch.no_grad():
            normed = bb.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[n][0, -1].float()
    finally:
        handle.remove()
    v = activations.extract(bb, "the cat is red", layer=n)
    torch.testing.assert_close(v, seen[0])
    assert not torch.allclose(v, normed, atol=1e-3)


@pytest.mark.parametrize("layer", [-1, 5, 99, 1.5, True])
def test_layer_out_of_range_is_refused(tiny_llama, layer):
    with pytest.raises(NLAInputError, match="layer"):
        activations.extract(tiny_llama, "the cat", layer=layer)


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text_is_refused(tiny_llama, text):
    with pytest.raises(NLAInputError, match="empty"):
        activations.extract(tiny_llama, text, layer=1)


def test_too_long_text_is_refused(tiny_llama):
    with pytest.raises(NLAInputError, match="tokens long"):
        activations.extract(tiny_llama, "the " * 400, layer=1)
