import numpy as np
import pytest

from jaxlab.agnn import data


def write_tiny_planetoid(directory, name="cora", num_nodes=120, num_all=80, num_train=15, classes=3, features=12,
                         seed=0):
  """A small homophilous graph in the raw Planetoid format: nodes [0, num_all) are allx (the first num_train
  labelled), nodes [num_all, num_nodes) the test nodes, listed in a shuffled test.index."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(classes, size=num_nodes)
  topic = np.zeros((classes, features))
  for c in range(classes):
    topic[c, c * features // classes:(c + 1) * features // classes] = 1
  x = (rng.random((num_nodes, features)) < 0.15 + 0.5 * topic[labels]).astype(np.float32)
  one_hot = np.eye(classes, dtype=np.float32)[labels]
  graph = {i: [] for i in range(num_nodes)}
  for i in range(num_nodes):
    same = np.flatnonzero(labels == labels[i])
    for j in rng.choice(same, size=2):
      if j != i:
        graph[i].append(int(j))
    graph[i].append(int(rng.integers(num_nodes)))
  test_ids = np.arange(num_all, num_nodes)
  order = rng.permutation(test_ids)
  # row k of tx belongs to node test.index[k]
  tx_file, ty_file = x[order], one_hot[order]
  data.write_planetoid(directory, name, x=x[:num_train], y=one_hot[:num_train], tx=tx_file, ty=ty_file,
                       allx=x[:num_all], ally=one_hot[:num_all], graph=graph, test_index=order.tolist())
  return labels


@pytest.fixture(scope="session")
def tiny_planetoid_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("planetoid")
  write_tiny_planetoid(directory, "cora")
  return directory
