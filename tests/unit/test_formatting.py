"""rmtorch.formatting's truncation rules, by hand: `cut_prompt` (training's --truncation keep_end) and `keep_last`
(the scorer's and the server's), each keeping a leading BOS."""

from __future__ import annotations

from rmtorch.formatting import cut_prompt, keep_last

BOS = 1


def test_keep_last_keeps_the_end_and_a_leading_bos():
    assert keep_last([BOS, 2, 3, 4, 5, 6], 4, BOS) == [BOS, 4, 5, 6]
    assert keep_last([7, 2, 3, 4, 5, 6], 4, BOS) == [3, 4, 5, 6]  # no BOS at the front: nothing to keep
    assert keep_last([BOS, 2, 3], 4, BOS) == [BOS, 2, 3]
    assert keep_last([BOS, 2, 3, 4, 5, 6], 4) == [3, 4, 5, 6]  # a tokenizer that adds no BOS


def test_cut_prompt_cuts_the_same_prompt_tokens_from_every_response():
    # prompt [BOS, 10, 11, 12, 13], responses of 3 and 2 tokens; max 6: the longest is 8, so 2 prompt tokens go
    chosen, rejected = [BOS, 10, 11, 12, 13, 20, 21, 22], [BOS, 10, 11, 12, 13, 30, 31]
    cut = cut_prompt([chosen, rejected], 5, 6, BOS)
    assert cut.sequences == [[BOS, 12, 13, 20, 21, 22], [BOS, 12, 13, 30, 31]]
    assert (cut.prompt_length, cut.cut, cut.at_turn) == (3, 2, False)


def test_cut_prompt_prefers_whole_turns_and_refuses_to_cut_a_response():
    chosen, rejected = [BOS, 10, 11, 12, 13, 20, 21, 22], [BOS, 10, 11, 12, 13, 30]
    cut = cut_prompt([chosen, rejected], 5, 6, BOS, turn_starts=[2, 4])  # a turn starts at 2 and at 4
    assert cut.sequences[0] == [BOS, 13, 20, 21, 22] and cut.at_turn and cut.cut == 3  # through the turn at 4
    assert cut_prompt([chosen, rejected], 5, 3, BOS) is None  # the response alone needs 4 with the BOS


def test_both_rules_agree_where_the_completion_fits():
    row = [BOS, 10, 11, 12, 13, 20, 21]
    assert cut_prompt([row], 5, 5, BOS).sequences[0] == keep_last(row, 5, BOS)
