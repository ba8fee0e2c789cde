"""Graph batches with static shapes: padding budgets, masks, segment ops and edge construction.

This is the only package in jaxlab that imports jraph; other packages take ``GraphsTuple`` and the
helpers from here. The usual flow: ``estimate_budget`` once per data set, ``batch_iterator`` (host) to
get padded batches, then inside jit the masks and segment ops with ``edge_mask``/``node_mask`` so
padding never reaches real nodes, losses or metrics.
"""

from jraph import GraphsTuple

from jaxlab.graph.construct import RadiusGraph, fully_connected_graph, radius_graph
from jaxlab.graph.masks import (
    edge_graph_ids,
    edge_mask,
    graph_mask,
    node_graph_ids,
    node_mask,
    zero_out_padding,
)
from jaxlab.graph.ops import segment_max, segment_mean, segment_softmax, segment_sum
from jaxlab.graph.padding import (
    Budget,
    batch,
    batch_iterator,
    check_graph,
    estimate_budget,
    pad_graphs,
    stack_device_batches,
    unbatch,
    unpad,
)

__all__ = [
    "Budget",
    "GraphsTuple",
    "RadiusGraph",
    "batch",
    "batch_iterator",
    "check_graph",
    "edge_graph_ids",
    "edge_mask",
    "estimate_budget",
    "fully_connected_graph",
    "graph_mask",
    "node_graph_ids",
    "node_mask",
    "pad_graphs",
    "radius_graph",
    "segment_max",
    "segment_mean",
    "segment_softmax",
    "segment_sum",
    "stack_device_batches",
    "unbatch",
    "unpad",
    "zero_out_padding",
]
