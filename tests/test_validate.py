"""The comparison rule behind validation: strict enough to catch a wrong channel, not so strict
that float reassociation in deep networks fails."""
import numpy as np

from onnxslim_opt.validate import compare_values


def test_rounding_noise_near_zero_in_a_large_output_passes():
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal(1000) * 300).astype(np.float32)
    ref[0] = 1e-3  # an element near zero
    got = ref.copy()
    got[0] += 5e-4  # what folding BN moves it by in a 50-layer net (ORT's own fusion does too)
    c = compare_values("y", ref, got, rtol=1e-4, atol=1e-5)
    assert c.matches and c.max_rel_diff > 0.1


def test_a_wrong_element_fails():
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal(1000) * 300).astype(np.float32)
    got = ref.copy()
    got[7] *= 1.01
    got[7] += 3  # a real bug: off by 1% plus a bias
    assert not compare_values("y", ref, got, rtol=1e-4, atol=1e-5).matches


def test_small_outputs_are_held_to_atol():
    ref = np.full(100, 1e-6, np.float32)
    got = ref + 2e-5
    assert not compare_values("y", ref, got, rtol=1e-4, atol=1e-5).matches


def test_nan_and_inf_must_match():
    ref = np.array([np.nan, np.inf, 1.0], np.float32)
    assert compare_values("y", ref, ref.copy(), 1e-4, 1e-5).matches
    assert not compare_values("y", ref, np.array([0.0, np.inf, 1.0], np.float32), 1e-4, 1e-5).matches


def test_integer_and_structured_outputs_compare_exactly():
    assert compare_values("i", np.array([1, 2]), np.array([1, 2]), 1e-4, 1e-5).matches
    assert not compare_values("i", np.array([1, 2]), np.array([1, 3]), 1e-4, 1e-5).matches
    zipmap = [{0: 0.25, 1: 0.75}]
    assert compare_values("z", zipmap, [{0: 0.25, 1: 0.75}], 1e-4, 1e-5).matches
    assert not compare_values("z", zipmap, [{0: 0.5, 1: 0.5}], 1e-4, 1e-5).matches
