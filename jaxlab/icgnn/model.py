"""ICGNN-style (reconstructed) information-carrying GNN on a homogeneous graph, and its two heads.

The paper (Sun et al., arXiv 2408.17252) abstracts a wireless network into a *virtual homogeneous graph*: one
node per transmitter–user link, so base stations, access points and users are no longer separate node types
and every node shares one network. Its equations are not public; this module follows the reconstruction in
the method notes, with each part separate so it can be swapped:

  graph        ``user_graph`` (MU-MISO: one node per BS–user link, fully connected over users) and
               ``cellfree.link_graph`` (one node per serving AP–UE link, edges between links that share an AP
               or a UE); both are jraph ``GraphsTuple`` with masks for padding.
  layer        :class:`ICGNNLayer`: ``m_kj = φ_m([h_j, e_kj])``, ``a_k = max_j m_kj`` (optionally with the
               mean), ``h_k ← φ_u([h_k, a_k, x_k])`` where ``x_k`` is the raw input *carried* into every layer.
               Shared MLPs and symmetric aggregation make it permutation equivariant over nodes.
  heads        :func:`precoding_powers` (per-user ``p, λ > 0``, each summing to P) feeding the optimal
               beamforming structure solved by conjugate gradient (no matrix inverse), and
               :func:`cellfree_powers` (per-AP softmax over its links times a per-AP power fraction).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import graph as jgraph


class MLP(nnx.Module):
  """``Linear → ReLU → Linear`` (the 2-layer φ of the layer)."""

  def __init__(self, in_dim: int, hidden: int, out_dim: int, *, rngs: nnx.Rngs):
    self.linear_1 = nnx.Linear(in_dim, hidden, rngs=rngs)
    self.linear_2 = nnx.Linear(hidden, out_dim, rngs=rngs)

  def __call__(self, x):
    return self.linear_2(jax.nn.relu(self.linear_1(x)))


class ICGNNLayer(nnx.Module):
  """One information-carrying message-passing layer over a ``GraphsTuple`` (edges point sender → receiver)."""

  def __init__(self, hidden: int, raw_dim: int, edge_dim: int, aggregation: str = "max", message_layers: int = 2,
               *, rngs: nnx.Rngs):
    if aggregation not in ("max", "max_mean"):
      raise ValueError(f"aggregation must be 'max' or 'max_mean', got {aggregation!r}")
    if message_layers not in (1, 2):
      raise ValueError(f"message_layers must be 1 or 2, got {message_layers!r}")
    self.aggregation = aggregation
    self.message = (MLP(hidden + edge_dim, hidden, hidden, rngs=rngs) if message_layers == 2
                    else nnx.Linear(hidden + edge_dim, hidden, rngs=rngs))
    agg_dim = hidden * (2 if aggregation == "max_mean" else 1)
    self.update = MLP(hidden + agg_dim + raw_dim, hidden, hidden, rngs=rngs)

  def __call__(self, h, raw, edge_x, senders, receivers, edge_mask, in_degree: int | None = None):
    """``in_degree``: every node receives exactly this many edges, stored consecutively by receiver (as in
    :func:`user_graph`); the aggregation is then a reshape and a reduction instead of a scatter, same numbers."""
    num_nodes, hidden = h.shape
    # φ_m's first layer on [h_j, e_kj] split into its node and edge parts: the node part is computed once per
    # node and gathered, instead of once per edge (the same numbers, a fraction of the work on dense graphs).
    first = self.message if isinstance(self.message, nnx.Linear) else self.message.linear_1
    kernel = first.kernel[...]
    m = jax.nn.relu((h @ kernel[:hidden])[senders] + edge_x @ kernel[hidden:] + first.bias[...])
    if not isinstance(self.message, nnx.Linear):
      m = jax.nn.relu(self.message.linear_2(m))
    if in_degree is not None:
      # Messages are >= 0 (ReLU), so zeros in masked slots leave the max unchanged and give 0 when all are masked.
      valid = edge_mask.reshape(num_nodes, in_degree, 1)
      m = jnp.where(valid, m.reshape(num_nodes, in_degree, hidden), 0.0)
      parts = [jnp.max(m, axis=1)]
      if self.aggregation == "max_mean":
        parts.append(jnp.sum(m, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1))
    else:
      parts = [jgraph.segment_max(m, receivers, num_nodes, mask=edge_mask)]
      if self.aggregation == "max_mean":
        parts.append(jgraph.segment_mean(m, receivers, num_nodes, mask=edge_mask))
    return jax.nn.relu(self.update(jnp.concatenate([h] + parts + [raw], axis=-1)))


class ICGNN(nnx.Module):
  """Encoder, ``num_layers`` information-carrying layers (one set of weights if ``shared``), per-node head.

  ``__call__(graph, node_mask, edge_mask, in_degree=None)`` reads ``graph.nodes["x"]`` ``[n, node_in]`` and
  ``graph.edges["x"]`` ``[e, edge_in]`` and returns ``[n, out_dim]``, zero at padded nodes. ``message_layers``
  is the depth of φ_m (2 as in the reconstruction; 1 makes the per-edge work a gather, an add and a ReLU).
  """

  def __init__(self, node_in: int, edge_in: int, out_dim: int, *, hidden: int = 128, num_layers: int = 3,
               shared: bool = False, aggregation: str = "max", message_layers: int = 2, rngs: nnx.Rngs):
    if num_layers < 1 or hidden < 1:
      raise ValueError(f"ICGNN needs num_layers >= 1 and hidden >= 1, got {num_layers} and {hidden}")
    self.num_layers, self.shared = num_layers, shared
    self.encoder = MLP(node_in, hidden, hidden, rngs=rngs)
    self.layers = nnx.List([ICGNNLayer(hidden, node_in, edge_in, aggregation, message_layers, rngs=rngs)
                            for _ in range(1 if shared else num_layers)])
    self.head = MLP(hidden + node_in, hidden, out_dim, rngs=rngs)

  def __call__(self, graph: jgraph.GraphsTuple, node_mask, edge_mask, in_degree: int | None = None):
    raw, edge_x = graph.nodes["x"], graph.edges["x"]
    h = jax.nn.relu(self.encoder(raw))
    for i in range(self.num_layers):
      layer = self.layers[0 if self.shared else i]
      h = layer(h, raw, edge_x, graph.senders, graph.receivers, edge_mask, in_degree)
    out = self.head(jnp.concatenate([h, raw], axis=-1))
    return jnp.where(node_mask[:, None], out, 0.0)


# ----- MU-MISO precoding: graph and head --------------------------------------------------------------------

def user_feature_dims(precoder_stats: bool) -> tuple[int, int]:
  """(node, edge) feature sizes of :func:`user_graph`."""
  return (6, 4) if precoder_stats else (4, 2)


def _fully_connected_pattern(batch: int, num_users: int):
  """Senders and receivers of B fully connected graphs of K nodes without self-loops, receiver-major (each
  node's K−1 in-edges consecutive, as ``ICGNN``'s ``in_degree`` path needs), plus the per-graph local indices."""
  # jaxlab.graph lists every ordered pair sender-major; the pair set is symmetric, so reading its senders as
  # receivers gives the receiver-major order.
  receivers, senders, _ = jgraph.fully_connected_graph(np.full(batch, num_users), self_loops=False)
  per_graph = num_users * (num_users - 1)
  return senders, receivers, receivers[:per_graph], senders[:per_graph]


def _db(x):
  return 10.0 * jnp.log10(jnp.maximum(x, 1e-12))


def user_graph(H_BxKxN, P, sigma2, user_mask_BxK, antenna_mask_BxN, W_BxNxK=None):
  """The homogeneous graph of a batch of MU-MISO channels, built on device (jit-able).

  Node k (the BS–user-k link): ``[10·log10(‖h_k‖² P/σ²)/10, 10·log10(P/σ²)/10, log2(K)/4, N/K/4]`` with K and N
  the real (unpadded) sizes. Edge j→k: ``[|ρ_kj|, |ρ_kj|²]``, ``ρ_kj = h_kᴴh_j/(‖h_k‖‖h_j‖)`` from the K×K Gram
  matrix, so no feature grows with N and one network serves every antenna count. Only moduli enter: the
  sum-SE is invariant to a phase rotation of any one user's channel, and so are these features.

  With a precoder ``W`` (e.g. the current iterate), its link gains ``g_kj = |h_kᴴ w_j|²/σ²`` are added, in dB/10:
  node k gets ``g_kk`` and its SINR, edge j→k gets ``g_kj`` (the leakage of j's beam at k) and ``g_jk``. These are
  also phase invariant, and they carry what the moduli of ρ lose: how the users' channels interact as a whole.

  Returns ``(graph, node_mask, edge_mask)``; padded users are nodes with masked features and edges.
  """
  b, k, _ = H_BxKxN.shape
  user_mask = user_mask_BxK.astype(bool)
  H = jnp.where(user_mask[:, :, None], H_BxKxN, 0)
  gain = jnp.sum(jnp.abs(H)**2, axis=-1)
  num_users = jnp.maximum(jnp.sum(user_mask, axis=1), 1).astype(jnp.float32)
  num_antennas = jnp.sum(antenna_mask_BxN, axis=1).astype(jnp.float32)
  snr_db = _db(jnp.asarray(P, jnp.float32) / sigma2) * jnp.ones((b,), jnp.float32)
  per_graph = jnp.stack([snr_db / 10.0, jnp.log2(num_users) / 4.0, num_antennas / num_users / 4.0], axis=-1)
  node_parts = [(_db(gain) + snr_db[:, None])[..., None] / 10.0, jnp.broadcast_to(per_graph[:, None], (b, k, 3))]
  gram = jnp.einsum("bkn,bjn->bkj", H, jnp.conj(H))
  norm = jnp.sqrt(jnp.maximum(gain, 1e-12))
  rho = jnp.abs(gram) / (norm[:, :, None] * norm[:, None, :])
  senders, receivers, recv_local, send_local = _fully_connected_pattern(b, k)
  edge_parts = [rho[:, recv_local, send_local], rho[:, recv_local, send_local]**2]
  if W_BxNxK is not None:
    link = jnp.abs(H @ W_BxNxK)**2 / sigma2 * (user_mask[:, :, None] & user_mask[:, None, :])
    signal = jnp.diagonal(link, axis1=1, axis2=2)
    interference = jnp.sum(link, axis=2) - signal
    node_parts += [_db(signal)[..., None] / 10.0, _db(signal / (interference + 1.0))[..., None] / 10.0]
    edge_parts += [_db(link[:, recv_local, send_local]) / 10.0, _db(link[:, send_local, recv_local]) / 10.0]
  node_x = jnp.concatenate(node_parts, axis=-1)
  node_x = jnp.where(user_mask[..., None], node_x, 0.0)
  edge_x = jnp.stack(edge_parts, axis=-1).reshape(b * k * (k - 1), len(edge_parts))
  edge_mask = (user_mask[:, recv_local] & user_mask[:, send_local]).reshape(-1)
  edge_x = jnp.where(edge_mask[:, None], edge_x, 0.0)
  graph = jgraph.GraphsTuple(nodes={"x": node_x.reshape(b * k, node_x.shape[-1])}, edges={"x": edge_x},
                             senders=jnp.asarray(senders), receivers=jnp.asarray(receivers), globals=None,
                             n_node=jnp.full((b,), k, jnp.int32), n_edge=jnp.full((b,), k * (k - 1), jnp.int32))
  return graph, user_mask.reshape(-1), edge_mask


def precoding_powers(out_BxKx2, P, user_mask_BxK):
  """Per-user ``(p, λ)``: softplus + 1e-6, masked, each normalised to sum to P over the real users."""
  positive = jax.nn.softplus(out_BxKx2) + 1e-6
  positive = jnp.where(user_mask_BxK[..., None], positive, 0.0)
  positive = P * positive / jnp.sum(positive, axis=1, keepdims=True)
  return positive[..., 0], positive[..., 1]


# ----- cell-free power allocation: head ---------------------------------------------------------------------

def cellfree_powers(out_nx2, graph: jgraph.GraphsTuple, node_mask, num_aps: int, rho_max):
  """Per-link downlink powers from the per-node outputs of a batch of link graphs.

  Each AP's links share a softmax over their first output (how the AP splits its power among its UEs) and the
  mean of their second output through a sigmoid (the fraction of ``rho_max`` the AP uses), so
  ``Σ_{k served by l} ρ_lk = rho_max·sigmoid(·) ≤ rho_max`` holds exactly for every AP, whatever the network.
  Segments are keyed by (graph in the batch, AP index), read from ``graph.nodes["ap"]``.
  """
  graph_ids = jgraph.node_graph_ids(graph)
  segment = graph_ids * num_aps + graph.nodes["ap"]
  num_segments = graph.n_node.shape[0] * num_aps
  share = jgraph.segment_softmax(out_nx2[:, 0], segment, num_segments, mask=node_mask)
  fraction = jax.nn.sigmoid(jgraph.segment_mean(out_nx2[:, 1], segment, num_segments, mask=node_mask))
  return jnp.where(node_mask, rho_max * share * fraction[segment], 0.0)
