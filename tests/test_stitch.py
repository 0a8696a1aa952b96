"""The ramp and the blend: symmetric, invisible on equal inputs, monotone between different ones."""

import numpy as np
import pytest

from farm.stitch import blend, ramp, to_uint8


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("n", [1, 2, 8, 16])
def test_ramp_is_symmetric_and_strictly_inside(kind, n):
    w = ramp(n, kind)
    assert w.shape == (n,)
    assert np.all(w > 0) and np.all(w < 1)
    assert np.allclose(w + w[::-1], 1.0, atol=1e-6)
    assert np.all(np.diff(w) > 0)


def test_blend_of_equal_frames_is_identity():
    rng = np.random.default_rng(0)
    x = rng.random((8, 4, 5, 3), dtype=np.float32)
    assert np.array_equal(to_uint8(blend(x, x)), to_uint8(x))


def test_blend_moves_from_tail_to_head():
    tail, head = np.zeros((8, 1, 1, 1), np.float32), np.ones((8, 1, 1, 1), np.float32)
    out = blend(tail, head).ravel()
    assert np.all(np.diff(out) > 0) and 0 < out[0] < 0.1 and 0.9 < out[-1] < 1


def test_blend_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        blend(np.zeros((2, 2, 2, 1)), np.zeros((3, 2, 2, 1)))


def test_to_uint8_rounds():
    assert to_uint8(np.array([0.0, 0.499 / 255, 0.501 / 255, 1.0, 1.5])).tolist() == [0, 0, 1, 255, 255]
