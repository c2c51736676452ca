"""The fusion rules that measure code activity from the codes of black (choose-max, l1-black):
what they pick, their consistency check, and that l1-black with a zero reference is the
authors' l1 rule bit for bit."""

from __future__ import annotations

import pytest
import torch

from napari_cscfusion.engine import rules


def _codes(seed: int = 0, s: int = 2, q: int = 6, h: int = 20, w: int = 24) -> torch.Tensor:
    return torch.randn(s, q, h, w, generator=torch.Generator().manual_seed(seed))


def test_choose_max_takes_every_code_of_the_source_farthest_from_black():
    black = torch.ones(6)  # black's codes: far from zero, as the packaged weights' are
    z = black.view(1, -1, 1, 1).repeat(2, 1, 20, 24)  # both sources black everywhere...
    z[0, :, :, :12] += 0.5  # ...but source 0 shows something on the left half
    z[1, :, :, 12:] -= 0.3  # and source 1 (codes nearer zero than black's) on the right half
    z[1, :, :, :12] += 0.2  # source 1 also shows a little on the left
    fused, w = rules.apply_rule("choose-max", z, reference=black)
    assert w.shape == (2, 1, 20, 24) and set(w.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(w.sum(0), torch.ones(1, 20, 24))
    # away from the boundary (activity window 3x3, vote 5x5) each half is one source's codes
    assert torch.equal(fused[:, :, :9], z[0, :, :, :9])
    assert torch.equal(fused[:, :, 15:], z[1, :, :, 15:])
    # measured from zero instead of from black, the right half would keep source 0's black
    far_from_zero = rules.code_activity(z).argmax(0)
    assert (far_from_zero[0, :, 15:] == 0).all()


def test_choose_max_majority_vote_removes_isolated_choices_and_keeps_ties():
    z = torch.zeros(2, 1, 15, 15)
    z[0] = 1.0  # source 0 farther from black (0) everywhere...
    z[1, 0, 7, 7] = 30.0  # ...except around one bright speck of source 1
    raw = rules.code_activity(z, torch.zeros(1)).argmax(0)
    assert (raw == 1).sum() >= 1  # without the vote the speck's neighbourhood is source 1
    fused, w = rules.choose_max_rule(z, torch.zeros(1))
    assert torch.equal(w[0], torch.ones(1, 15, 15))  # the vote gives it back to source 0
    assert torch.equal(fused, z[0])
    # a tie of the votes keeps the pixel's own choice: two sources with equal codes
    same = torch.ones(2, 3, 9, 9)
    fused, w = rules.choose_max_rule(same, torch.zeros(3))
    assert torch.equal(fused, same[0])


def test_l1_black_with_a_zero_reference_is_the_l1_rule_bit_for_bit_and_differs_otherwise():
    z = _codes(1)
    f_l1, w_l1 = rules.apply_rule("l1", z)
    f_zero, w_zero = rules.apply_rule("l1-black", z, reference=torch.zeros(z.shape[1]))
    assert torch.equal(f_l1, f_zero) and torch.equal(w_l1, w_zero)
    f_ref, w_ref = rules.apply_rule("l1-black", z, reference=torch.full((z.shape[1],), 0.7))
    assert (w_ref - w_l1).abs().max() > 0.01
    torch.testing.assert_close(w_ref.sum(0), torch.ones_like(w_ref[0]))


@pytest.mark.parametrize("rule", sorted(rules.REFERENCE_RULES))
def test_black_reference_rules_need_the_codes_of_black_and_have_a_halo(rule):
    with pytest.raises(ValueError, match="codes of black"):
        rules.apply_rule(rule, _codes())
    assert rule in rules.RULES
    z = _codes(2, h=30, w=30)
    ref = torch.zeros(z.shape[1])
    whole, _ = rules.apply_rule(rule, z, reference=ref)
    # a crop with the halo around its core fuses its core as the whole image does
    r, core = rules.RULE_RADIUS[rule], (slice(10, 20), slice(8, 22))
    crop = z[:, :, 10 - r:20 + r, 8 - r:22 + r]
    part, _ = rules.apply_rule(rule, crop, reference=ref)
    assert torch.equal(part[:, r:-r, r:-r], whole[:, core[0], core[1]])
