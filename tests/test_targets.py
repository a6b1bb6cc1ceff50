"""The cache's top-K (pipeline.cache.targets.teacher_targets) is the full stable sort's head bit for bit, ties
included: random logits with many ties (bf16-rounded, coarse grids, repeated values, +-inf, signed zeros, equal
rows, NaN) against the full-sort function it replaces, at K and C around the candidate count's edges."""

import numpy as np
import pytest
import torch

from pipeline.cache.targets import SPARE, stable_topk, stored_arrays, teacher_targets


def full_sort_targets(logits: torch.Tensor, k: int) -> dict:
    """The reference: every row fully stable-sorted (value descending, ties by lower class id)."""
    x = logits.detach().float()
    out = {"argmax": x.argmax(-1)}
    if k:
        values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
        out.update(topk_values=values[:, :k].half(), topk_indices=indices[:, :k],
                   logsumexp=torch.logsumexp(x.double(), dim=-1).float())
    return out


def tied_logits(rng: np.random.Generator, rows: int, classes: int) -> torch.Tensor:
    """Rows of many kinds of ties, each kind in a block of rows."""
    kinds = [
        lambda n: torch.from_numpy(rng.normal(0, 3, (n, classes)).astype(np.float32)).bfloat16().float(),
        lambda n: torch.from_numpy(np.round(rng.normal(0, 2, (n, classes))).astype(np.float32)),  # integer grid
        lambda n: torch.from_numpy(rng.integers(0, 3, (n, classes)).astype(np.float32)),  # three values
        lambda n: torch.full((n, classes), 1.5),  # equal rows
        lambda n: torch.from_numpy(rng.choice([0.0, -0.0, 1.0, -np.inf], (n, classes)).astype(np.float32)),
        lambda n: torch.from_numpy(rng.choice([np.inf, 2.0, -np.inf], (n, classes)).astype(np.float32)),
        lambda n: torch.from_numpy(rng.normal(0, 1, (n, classes)).astype(np.float32)),  # no ties (fast path)
    ]
    blocks = [kind(max(1, rows // len(kinds))) for kind in kinds]
    x = torch.cat(blocks)
    top = x[:, :1].clone()
    x[::5, 1 % classes] = top[::5, 0] + 100  # a raised top that ties with ...
    x[::5, classes - 1] = top[::5, 0] + 100  # ... the last class
    nan_rows = rng.choice(len(x), size=3, replace=False)
    x[nan_rows, rng.integers(0, classes, 3)] = float("nan")
    x[nan_rows[0], rng.random(classes) < 0.5] = float("nan")  # more NaN than candidates
    return x[torch.from_numpy(rng.permutation(len(x)))]


def assert_bitwise(got, want: dict) -> None:
    for f, w in want.items():
        g = getattr(got, f)
        assert g.dtype == w.dtype and g.shape == w.shape, f
        if g.is_floating_point():  # the bits: signed zeros and NaN compared too
            bits = torch.int16 if g.dtype == torch.float16 else torch.int32
            g, w = g.view(bits), w.view(bits)
        assert torch.equal(g, w), f


@pytest.mark.parametrize("classes", [1000, 100, 16, 5])
def test_topk_equals_the_full_stable_sort_bit_for_bit(classes):
    rng = np.random.default_rng(classes)
    x = tied_logits(rng, 700, classes)
    edges = {1, 2, 5, 10, classes - SPARE - 1, classes - SPARE, classes - 1, classes}
    for k in sorted(edges & set(range(1, classes + 1))):
        assert_bitwise(teacher_targets(x, k), full_sort_targets(x, k))
    assert_bitwise(teacher_targets(x, 0), full_sort_targets(x, 0))


def test_ties_at_and_past_the_candidates_edge():
    """Row 0's tie lies inside the candidates; row 1's K-th value ties with classes left out of them."""
    x = torch.tensor([[0.0, 5.0, 4.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.125],
                      [1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])  # row 1: the K-th ties past the candidates
    values, indices = stable_topk(x, 2)
    assert indices.tolist() == [[1, 2], [1, 2]] and values.tolist() == [[5.0, 4.0], [2.0, 2.0]]
    values, indices = stable_topk(x, 3)
    assert indices.tolist() == [[1, 2, 3], [1, 2, 3]]


def test_stored_arrays_match_the_full_sort():
    """What a store writes (numpy, the store's dtypes) for bf16-rounded ImageNet-shaped logits."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(0, 4, (512, 1000)).astype(np.float32)).bfloat16().float()
    got = stored_arrays(x.numpy(), 10, np.dtype(np.uint16))
    want = full_sort_targets(x, 10)
    np.testing.assert_array_equal(got["topk_indices"], want["topk_indices"].numpy().astype(np.uint16))
    np.testing.assert_array_equal(got["topk_values"].view(np.int16), want["topk_values"].numpy().view(np.int16))
    np.testing.assert_array_equal(got["argmax"], want["argmax"].numpy())
    np.testing.assert_array_equal(got["logsumexp"].view(np.int32), want["logsumexp"].numpy().view(np.int32))
