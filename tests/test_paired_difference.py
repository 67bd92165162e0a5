"""The paired comparison of two exit policies on the same rows (tools/quant_study_smollm2.py: recal vs fp32 policy)."""

import numpy as np
import pytest

from adainfer.calib.evidence import paired_difference, within_margin


def rows(both: int, only_a: int, only_b: int, neither: int):
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    order = np.random.default_rng(0).permutation(len(a))  # the row order does not matter
    return np.asarray(a)[order], np.asarray(b)[order]


def test_counts_difference_interval_and_mcnemar():
    # 20 rows: 8 both right, 6 only A, 2 only B, 4 neither -> A - B = 4 / 20 = 20 points;
    # Wald: 100 * (0.2 ± 1.95996 * sqrt(8 - 16 / 20) / 20); McNemar exact: 2 * P(X >= 6 | 8, 1/2) = 74 / 256
    p = paired_difference(*rows(8, 6, 2, 4))
    assert (p["rows"], p["only_a"], p["only_b"]) == (20, 6, 2)
    assert p["difference_points"] == pytest.approx(20.0, abs=1e-9)
    assert p["interval_points"] == pytest.approx([-6.295676217297447, 46.29567621729745], abs=1e-9)
    assert p["mcnemar_p"] == pytest.approx(74 / 256, abs=1e-12)
    assert within_margin(p) == "undecided"


def test_identical_answers_transfer_and_a_clear_loss_does_not():
    same = paired_difference(*rows(200, 0, 0, 100))
    assert same["difference_points"] == 0 and same["interval_points"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0
    assert within_margin(same) == "yes"
    # 3 rows of 300 better with A: +1 point, interval [-0.126, +2.126]: cannot tell
    small = paired_difference(*rows(200, 3, 0, 97))
    assert small["interval_points"] == pytest.approx([-0.12591358941486333, 2.1259135894148637], abs=1e-9)
    assert within_margin(small) == "undecided"
    # 30 rows of 300 better with A, none with B: +10 points, the whole interval above 1 point
    assert within_margin(paired_difference(*rows(200, 30, 0, 70))) == "no"
    # B better: 30 rows of 300 only B right -> -10 points, the whole interval below +1
    assert within_margin(paired_difference(*rows(200, 0, 30, 70))) == "yes"


def test_mismatched_rows_are_refused():
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([1, 0, 1], [1, 0])


def test_two_tasks_pool_by_adding_their_discordant_counts():
    from adainfer.calib.evidence import paired_counts

    first, second = rows(150, 20, 9, 121), rows(100, 25, 20, 155)
    pooled = paired_counts(20 + 25, 9 + 20, 300 + 300)
    assert pooled == paired_difference(np.concatenate([first[0], second[0]]), np.concatenate([first[1], second[1]]))
    assert pooled["difference_points"] == pytest.approx(100 * 16 / 600, abs=1e-9)
    with pytest.raises(ValueError, match="do not fit"):
        paired_counts(200, 150, 300)


def test_outcome_keeps_each_rows_answer_only_when_asked(stories_bundle):
    """The per-row answers the paired comparison uses are the ones the Outcome's accuracy counts."""
    from adainfer.calib.features import FeatureTable
    from adainfer.calib.simulate import outcome
    from adainfer.manifest import Manifest
    from adainfer.runtime.exit_policy import ExitPolicy

    manifest = Manifest.load(stories_bundle)
    L, n = manifest.num_layers, 4
    pred = np.arange(n * L).reshape(n, L) % 3  # row r answers (r * L + l - 1) % 3 at layer l
    scores = np.zeros((n, L))
    scores[0, 0] = scores[1, 2] = 1.0  # row 0 leaves after layer 1, row 1 after layer 3, rows 2 and 3 run full depth
    gold = np.array([pred[0, 0], 2, pred[2, -1], (pred[3, -1] + 1) % 3])
    table = FeatureTable(gap=scores, top_prob=scores, cos_prev=scores, norm_ratio=scores, pred=pred, gold=gold,
                         doc_id=np.arange(n), context=np.full(n, 8), hidden=None, task="sst2")
    policy = ExitPolicy(decision="rule", features=["gap"], threshold=0.5)
    kept = outcome(table, manifest, policy, scores, 0.5, keep_answers=True)
    assert kept.answers.tolist() == [pred[0, 0], pred[1, 2], pred[2, -1], pred[3, -1]]
    assert kept.accuracy == pytest.approx(np.mean(kept.answers == gold))
    assert kept.accuracy == pytest.approx(0.5 + 0.25 * (pred[1, 2] == 2))
    assert "answers" not in kept.to_dict()
    assert outcome(table, manifest, policy, scores, 0.5).answers is None
