"""Client graphs given with the data (tasks.client_graph): every file format keyed by client
value, coordinates, and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.client_graph import coordinate_adjacency, read_client_graph, read_locations_table
from tasks.datasets import DataError

CLIENTS = ["north", "south", "east", "west"]


def _expected(pairs, n=4, weights=None):
    a = np.zeros((n, n))
    for k, (i, j) in enumerate(pairs):
        a[i, j] = 1.0 if weights is None else weights[k]
    return a


@pytest.mark.parametrize("text", [
    "source,target\nnorth,south\neast,west\n",   # header
    "north,south\neast,west\n",                  # no header
    "from,to,weight\nnorth,south,1\neast,west,1\n",
])
def test_edge_lists(tmp_path, text):
    (tmp_path / "g.csv").write_text(text)
    assert np.array_equal(read_client_graph(tmp_path / "g.csv", CLIENTS), _expected([(0, 1), (2, 3)]))


def test_edge_list_weights_numeric_ids_and_dropped_clients(tmp_path):
    (tmp_path / "g.csv").write_text("a,b,w\n1,2,0.5\n2.0,3,2\n3,9,1\n")
    a = read_client_graph(tmp_path / "g.csv", ["1", "2", "3"], dropped=["9"])
    assert np.array_equal(a, _expected([(0, 1), (1, 2)], n=3, weights=[0.5, 2.0]))
    with pytest.raises(DataError, match=r"g\.csv line 4: '9' is not a client; expected client values such as '1', '2', '3'"):
        read_client_graph(tmp_path / "g.csv", ["1", "2", "3"])
    (tmp_path / "neg.csv").write_text("north,south,-1\n")
    with pytest.raises(DataError, match=r"neg\.csv line 1: weight '-1' must be finite and non-negative"):
        read_client_graph(tmp_path / "neg.csv", CLIENTS)


def test_dense_matrices_keyed_by_client_value(tmp_path):
    order = ["west", "east", "south", "north", "extra"]  # another order and a client the task does not keep
    m = np.zeros((5, 5))
    m[0, 1] = m[1, 0] = 1  # west–east
    m[3, 2] = 0.7  # north→south
    body = "\n".join(",".join(f"{v:g}" for v in row) for row in m)
    (tmp_path / "header.csv").write_text(",".join(order) + "\n" + body + "\n")
    rows = "\n".join(name + "," + ",".join(f"{v:g}" for v in row) for name, row in zip(order, m))
    (tmp_path / "idcol.csv").write_text("," + ",".join(order) + "\n" + rows + "\n")
    want = np.zeros((4, 4))
    want[3, 2] = want[2, 3] = 1
    want[0, 1] = 0.7
    for name in ("header.csv", "idcol.csv"):
        assert np.allclose(read_client_graph(tmp_path / name, CLIENTS), want), name
    plain = np.eye(4)[::-1]
    np.savetxt(tmp_path / "plain.csv", plain, delimiter=",", fmt="%g")
    assert np.array_equal(read_client_graph(tmp_path / "plain.csv", CLIENTS), plain)  # task order
    np.savez(tmp_path / "g.npz", adj_mx=plain)
    assert np.array_equal(read_client_graph(tmp_path / "g.npz", CLIENTS), plain)
    with pytest.raises(DataError, match=r"plain\.csv: a 4 x 4 matrix without client ids, but the task keeps 3 clients"):
        read_client_graph(tmp_path / "plain.csv", CLIENTS[:3])
    with pytest.raises(DataError, match=r"header\.csv: the matrix has no row for clients \['middle'\]"):
        read_client_graph(tmp_path / "header.csv", CLIENTS + ["middle"])


def test_graph_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: graph file not found \(task option graph_file\)"):
        read_client_graph(tmp_path / "nope.csv", CLIENTS)
    (tmp_path / "wide.csv").write_text("a,b,c,d\n1,2,3,4\n")
    with pytest.raises(DataError, match=r"wide\.csv: expected an edge list \(source,target\[,weight\] per row\) or an N x N"):
        read_client_graph(tmp_path / "wide.csv", CLIENTS)


def test_coordinates_knn_and_locations_file(tmp_path):
    coords = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0]])
    a = coordinate_adjacency(coords, "euclidean", 1, "x")
    assert a[0, 1] == 1 and a[2, 3] == 1 and float(a.sum()) == 4
    with pytest.raises(DataError, match=r"where: latitude must be in \[-90, 90\]"):
        coordinate_adjacency(np.array([[100.0, 0.0], [0.0, 0.0]]), "haversine", 1, "where")
    (tmp_path / "loc.csv").write_text("id,lat,lon\nsouth,1,2\nnorth,3,4\n")
    assert np.array_equal(read_locations_table(tmp_path / "loc.csv", ["north", "south"], ["lat", "lon"]), [[3, 4], [1, 2]])
    with pytest.raises(DataError, match=r"loc\.csv: column 'id' has no row for clients \['east'\]"):
        read_locations_table(tmp_path / "loc.csv", ["north", "east"], ["lat", "lon"])
