"""The loglikelihood plan applies the output head only at the scored positions: same numbers as
the full-logits computation (HFLM's), for tied and untied heads, with rows shared by requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.evaluation.lm import LoglikelihoodPlan, ResidentLM, _kept_positions, accepts_logits_to_keep
from tests.test_evaluation import _tokenizer, make_model

FIXTURES = Path(__file__).parent / "fixtures" / "evals"


def test_kept_positions_rank_in_row_major_order():
    keep, kept = _kept_positions([1, 0, 0, 1, 1], [2, 3, 1, 2, 0], (2, 4))
    assert keep.tolist() == [[False, True, False, True], [True, False, True, False]]
    # row-major True entries: (0,1)->0 (0,3)->1 (1,0)->2 (1,2)->3; a repeated position shares its rank
    assert kept.tolist() == [3, 1, 0, 3, 2]


@pytest.mark.parametrize("tie", [False, True])
def test_partial_head_equals_full_logits(tie):
    tok = _tokenizer()
    model = make_model(tok, 5)
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    assert accepts_logits_to_keep(model)
    lm = ResidentLM(model, tok, batch_size=3)
    # shared contexts (several continuations of one input), different lengths, multi-token continuations
    args = [("12+3=", "15"), ("12+3=", "16"), ("7+7=", "14\n"), ("1=", "1"), ("99+1=", "100"), ("", "42"),
            ("12+3=1", "5")]
    partial = LoglikelihoodPlan.build(lm, args)
    full = LoglikelihoodPlan.build(lm, args)
    full.head_at_scored_positions = False
    with torch.no_grad():
        a, b = partial.run(lm), full.run(lm)
    assert [g for _, g in a] == [g for _, g in b]
    torch.testing.assert_close(torch.tensor([x for x, _ in a]), torch.tensor([x for x, _ in b]), atol=1e-5, rtol=1e-5)
    assert lm.timer.calls == 2 * len(partial.batches)  # both paths are timed as model compute
