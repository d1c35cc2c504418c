"""``check_greedy_tokens`` (and ``check_logit_rows`` at its end), the check of a low-precision run's greedy tokens against transformers':
it accepts the oracle's own tokens and a parting at a tie, and refuses a wrong token, a parting
before ``min_shared`` and, where ``exact``, any difference."""

from __future__ import annotations

import pytest
import torch

from tierflow.testing import check_greedy_tokens, check_logit_rows, oracle_greedy, oracle_logits

PROMPT = [5, 17, 3, 99, 42, 7]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def greedy(tiny_model):
    return oracle_greedy(tiny_model, PROMPT, NEW_TOKENS)


def _runner_up(path, prefix: list[int]) -> tuple[int, float]:
    """The second-best next token after ``prefix`` and its gap to the best (relative to the row)."""
    row = oracle_logits(path, PROMPT + prefix)[-1]
    top = torch.topk(row, 2)
    return int(top.indices[1]), ((top.values[0] - top.values[1]) / row.abs().max()).item()


def _worst(path, prefix: list[int]) -> int:
    return int(oracle_logits(path, PROMPT + prefix)[-1].argmin())


def test_the_oracles_own_tokens_pass_exact_or_not(tiny_model, greedy):
    check_greedy_tokens(tiny_model, PROMPT, list(greedy), greedy, exact=True)
    check_greedy_tokens(tiny_model, PROMPT, list(greedy), greedy, exact=False)


def test_any_difference_fails_an_exact_check(tiny_model, greedy):
    other, _ = _runner_up(tiny_model, greedy[:3])
    with pytest.raises(AssertionError, match="differ"):
        check_greedy_tokens(tiny_model, PROMPT, greedy[:3] + [other] + greedy[4:], greedy, exact=True)


def test_a_parting_at_a_tie_passes_and_a_wrong_token_fails(tiny_model, greedy):
    other, gap = _runner_up(tiny_model, greedy[:3])
    tokens = greedy[:3] + [other] + greedy[4:]
    check_greedy_tokens(tiny_model, PROMPT, tokens, greedy, exact=False, tolerance=gap * 1.01)
    with pytest.raises(AssertionError, match="not a tie"):
        check_greedy_tokens(tiny_model, PROMPT, tokens, greedy, exact=False, tolerance=gap * 0.99)
    wrong = greedy[:3] + [_worst(tiny_model, greedy[:3])] + greedy[4:]
    with pytest.raises(AssertionError, match="not a tie"):
        check_greedy_tokens(tiny_model, PROMPT, wrong, greedy, exact=False)


def test_a_parting_before_min_shared_fails(tiny_model, greedy):
    other, gap = _runner_up(tiny_model, greedy[:1])
    tokens = greedy[:1] + [other] + greedy[2:]
    check_greedy_tokens(tiny_model, PROMPT, tokens, greedy, exact=False, tolerance=gap * 1.01, min_shared=1)
    with pytest.raises(AssertionError, match="before 2"):
        check_greedy_tokens(tiny_model, PROMPT, tokens, greedy, exact=False, tolerance=gap * 1.01, min_shared=2)


def test_logit_rows_pass_at_the_share_and_fail_below_it():
    expected = torch.ones(20, 4)
    logits = expected.clone()
    logits[:1] += 1.0                                  # one row of twenty off: 95% within
    check_logit_rows(logits, expected, tolerance=3e-2, share=0.9)
    logits[1:3] += 1.0                                 # three rows off: 85%
    with pytest.raises(AssertionError, match="only 85% of rows within"):
        check_logit_rows(logits, expected, tolerance=3e-2, share=0.9)
