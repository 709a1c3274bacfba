from __future__ import annotations

import numpy as np
import pytest

from atajo.cache.semantic.index import VectorIndex


def unit(seed: int, dimension: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)
    return v / np.linalg.norm(v)


def test_top_k_in_order_with_exact_scores() -> None:
    index = VectorIndex(dimension=8)
    for i in range(20):
        index.add("p", f"k{i}", unit(i), f"text {i}")
    found = index.search("p", unit(3), k=3)
    assert found[0].key == "k3"
    assert found[0].text == "text 3"
    assert found[0].score == pytest.approx(1.0, abs=1e-5)
    assert [n.score for n in found] == sorted((n.score for n in found), reverse=True)
    assert len(index.search("p", unit(3), k=50)) == 20


def test_partitions_never_see_each_other() -> None:
    index = VectorIndex(dimension=8)
    index.add("tenant-a/model-x", "a1", unit(1), "same question")
    index.add("tenant-b/model-x", "b1", unit(2), "other")
    index.add("tenant-a/model-y", "a2", unit(1), "same question")
    found = index.search("tenant-b/model-x", unit(1), k=5)
    assert [n.key for n in found] == ["b1"]
    assert [n.key for n in index.search("tenant-a/model-x", unit(1), k=5)] == ["a1"]
    assert index.search("tenant-c/model-x", unit(1)) == []


def test_delete_and_replace() -> None:
    index = VectorIndex(dimension=8)
    index.add("p", "k1", unit(1), "one")
    index.add("p", "k2", unit(2), "two")
    assert index.delete("k1")
    assert not index.delete("k1")
    assert [n.key for n in index.search("p", unit(1), k=5)] == ["k2"]
    index.add("p", "k2", unit(3), "three")  # replacing a key keeps one entry
    assert len(index) == 1
    assert index.search("p", unit(3))[0].text == "three"
    index.delete("k2")
    assert index.partitions == 0


def test_bounded_evicts_oldest_untouched() -> None:
    index = VectorIndex(dimension=8, max_entries=3)
    for i in range(3):
        index.add(f"p{i % 2}", f"k{i}", unit(i), str(i))
    index.touch("k0")
    index.add("p0", "k3", unit(3), "3")
    assert len(index) == 3
    assert "k1" not in index
    assert "k0" in index
    assert index.evictions == 1


def test_graph_search_for_large_partitions_matches_brute_force() -> None:
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    graph = VectorIndex(dimension=16, ann_threshold=200)
    exact = VectorIndex(dimension=16, ann_threshold=10_000)
    for i, v in enumerate(vectors):
        graph.add("p", f"k{i}", v, str(i))
        exact.add("p", f"k{i}", v, str(i))
    for i in range(0, 600, 10):
        graph.delete(f"k{i}")
        exact.delete(f"k{i}")
    graph.add("p", "k0", vectors[0], "0")  # a freed slot is reused
    exact.add("p", "k0", vectors[0], "0")
    agree = 0
    for q in range(0, 600, 7):
        query = vectors[q] + 0.05 * rng.standard_normal(16).astype(np.float32)
        query /= np.linalg.norm(query)
        g, e = graph.search("p", query, k=2), exact.search("p", query, k=2)
        agree += g[0].key == e[0].key
        assert g[0].score == pytest.approx(float(vectors[int(g[0].text)] @ query), abs=1e-5)
    assert agree >= 0.95 * len(range(0, 600, 7))


def test_rejects_wrong_dimension() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        VectorIndex(dimension=8).add("p", "k", np.ones(4, dtype=np.float32), "t")


def test_graph_index_then_embedder_does_not_crash() -> None:
    """onnxruntime segfaults when imported after usearch; the index imports it first (fresh process)."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from atajo.cache.semantic.index import VectorIndex\n"
        "index = VectorIndex(dimension=4, ann_threshold=2)\n"
        "for i in range(3): index.add('p', str(i), np.eye(4, dtype=np.float32)[i], str(i))\n"
        "import onnxruntime\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_neighbours_carry_a_copy_of_their_stored_vector() -> None:
    index = VectorIndex(dimension=8)
    index.add("p", "k1", unit(1), "one")
    (found,) = index.search("p", unit(1), k=1)
    assert found.vector is not None
    assert np.allclose(found.vector, unit(1))
    index.add("p", "k1", unit(2), "one, replaced")  # the slot is reused; the copy handed out is not touched
    assert np.allclose(found.vector, unit(1))
