"""Find weighted ops that read the same activation (q/k/v, gate/up).

The graph, not a name regex, decides: two input quantizers whose node reads
the same producer tensor are joined by an edge, and the connected components
of that "reads the same tensor" graph are the shared-input groups. TensorRT
fuses such projections into one GEMM, so they must share one input amax, one
pre_quant_scale and, in auto_quantize, one format.
"""

from __future__ import annotations

from collections import defaultdict

import networkx as nx
from torch import fx

from qpass.passes.insert_quantizers import QUANTIZER_META, SLOT_META, quantizer_nodes


def input_reader_edges(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Edges between owner modules whose input quantizers read one producer node."""
    by_producer: dict[fx.Node, list[str]] = defaultdict(list)
    for q in quantizer_nodes(gm):
        if q.meta[SLOT_META] != "input_quantizer":
            continue
        owner = q.meta[QUANTIZER_META].rpartition(".")[0]
        by_producer[q.args[0]].append(owner)
    edges = []
    for owners in by_producer.values():
        owners = sorted(set(owners))
        edges.extend((owners[0], o) for o in owners[1:])
        if len(owners) == 1:
            edges.append((owners[0], owners[0]))
    return edges


def shared_input_groups(edge_lists) -> list[list[str]]:
    """Connected components (of two or more modules) over the edges of all graphs."""
    g = nx.Graph()
    for edges in edge_lists:
        for a, b in edges:
            g.add_edge(a, b)
    groups = [sorted(c) for c in nx.connected_components(g) if len(c) > 1]
    return sorted(groups)
