"""Self-contained PyTorch port of the official PONITA (ebekkers/ponita, main) for *timing only*.

Why this file exists
--------------------
The official implementation depends on torch_geometric / torch_scatter / pytorch_lightning, which
cannot be installed offline here. To compare jaxlab's PONITA against the official implementation on
the same machine in the same run, this module re-expresses the official computation with plain
PyTorch, keeping its operation structure op for op:

* graph transform inside ``forward`` (``PositionOrientationGraph`` + ``SEnInvariantAttributes``):
  lifting of scalars (``repeat_interleave``) and vectors (``einsum``) to the orientation grid,
  ``coalesce(add_self_loops(edge_index))`` on the edge list, invariants per edge *and* per
  orientation ``[E, O, 2]`` (a1 = <rel, o>, a2 = ||rel - a1 o||) and fibre invariants ``[O, O, 1]``,
  edge distances ``[E, 1]`` for the (here trivial) window;
* kernel bases ``Sequential(PolynomialFeatures(3), Linear, GELU, Linear, GELU)`` evaluated once
  on ``[E, O, 14]`` and ``[O, O, 3]`` and shared by all layers;
* ``FiberBundleConv`` (separable, depthwise): ``kernel = Linear_{K->C}(basis)`` -> ``[E, O, C]``,
  PyG message passing = ``x.index_select(0, source)`` (PyG's ``_lift``), message ``kernel * x_j``,
  sum aggregation = ``zeros.scatter_add_(0, broadcast(target), msg)`` (PyG's ``utils.scatter``
  for ``reduce='sum'``, the torch_scatter-free path), fibre step
  ``einsum('boc,opc->bpc') / O``, bias; data-dependent calibration on the first training batch;
* ``ConvNext`` block: conv, LayerNorm(eps 1e-5), Linear C->4C, exact GELU, Linear 4C->C,
  optional layer scale, residual;
* readout ``Linear_{C->S+V}`` after every block, averaged; scalar readout = mean over the grid +
  ``global_add_pool`` (here ``index_add``-free ``scatter_add_``); vector readout
  ``einsum('bnc,nd->bcd') / O``;
* Lightning training steps of ``lightning_wrappers/md17.py`` and ``lightning_wrappers/nbody.py``:
  random-rotation augmentation, forces ``-autograd.grad(E, pos, create_graph=True)``, the official
  losses, ``Adam`` with the official decay / no-decay parameter groups, global-norm gradient
  clipping 0.5 (``gradient_clip_val``), and for rMD17 the EMA(0.99) optimizer wrapper update.
  Use ``--minimal`` to time only forward / forces / backward / Adam.

Deliberate differences (none changes tensor shapes or FLOPs of the model):
* orientation grid: Fibonacci lattice (jaxlab spec 2.2) instead of the unseeded Coulomb-repulsion
  grid of the official constructor;
* ``nn.LazyLinear`` replaced by ``nn.Linear`` with the known input width (14 / 3);
* no Lightning / torchmetrics / logger bookkeeping, no data loader (the batch is pre-collated).

Run:  python benchmarks/reference/ponita_torch.py --workload rmd17 \
          --threads 2 --steps 20 --wait-idle 300 --out results.jsonl
      python benchmarks/reference/ponita_torch.py --self-test
Records carry ``other_cpu_frac``: CPU contention from other processes inflates these timings
enormously (see README.md), so discard records where it is above a few per cent.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

# ----------------------------------------------------------------------------------------------
# Geometry helpers (ponita/geometry, ponita/utils/to_from_sphere.py)
# ----------------------------------------------------------------------------------------------


def fibonacci_grid_s2(n: int, dtype=torch.float32) -> torch.Tensor:
    """Deterministic Fibonacci lattice on S2, [n, 3] (jaxlab spec 2.2)."""
    i = torch.arange(n, dtype=torch.float64)
    theta = torch.remainder(math.pi * i * (1.0 + math.sqrt(5.0)), 2.0 * math.pi)
    phi = torch.arccos(1.0 - 2.0 * (i + 0.5) / n)
    grid = torch.stack(
        [torch.cos(theta) * torch.sin(phi), torch.sin(theta) * torch.sin(phi), torch.cos(phi)], dim=-1
    )
    return grid.to(dtype)


def scalar_to_sphere(scalar, ori_grid):
    return scalar.unsqueeze(-2).repeat_interleave(ori_grid.shape[-2], dim=-2)  # [N, O, S]


def vec_to_sphere(vec, ori_grid):
    return torch.einsum("bcd,nd->bnc", vec, ori_grid)  # [N, O, V]


def sphere_to_scalar(signal):
    return signal.mean(dim=-2)  # [N, S]


def sphere_to_vec(signal, ori_grid):
    return torch.einsum("bnc,nd->bcd", signal, ori_grid) / ori_grid.shape[-2]  # [N, V, 3]


def random_rotation_matrix(generator=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform random rotation (normalised Gaussian quaternion), [3, 3]."""
    q = torch.randn(4, generator=generator, dtype=torch.float64)
    q = q / q.norm()
    w, x, y, z = q.tolist()
    m = torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float64,
    )
    return m.to(dtype)


# ----------------------------------------------------------------------------------------------
# Minimal replacements for torch_geometric utilities (same torch ops as PyG's torch-only paths)
# ----------------------------------------------------------------------------------------------


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """PyG ``utils.scatter(src, index, dim=0, reduce='sum')``: broadcast index + scatter_add_."""
    size = list(src.shape)
    size[0] = dim_size
    view = [-1] + [1] * (src.dim() - 1)
    index = index.view(view).expand_as(src)
    return src.new_zeros(size).scatter_add_(0, index, src)


def coalesce(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """PyG ``coalesce``: sort by (row, col) and drop duplicates."""
    idx = edge_index[0] * num_nodes + edge_index[1]
    idx, perm = torch.sort(idx)
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[1:] = idx[1:] > idx[:-1]
    return edge_index[:, perm[keep]]


def add_self_loops(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    loop = torch.arange(num_nodes, device=edge_index.device, dtype=edge_index.dtype)
    return torch.cat([edge_index, loop.unsqueeze(0).repeat(2, 1)], dim=1)


def global_add_pool(x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    return scatter_sum(x, batch, num_graphs)


class Graph:
    """Tiny stand-in for ``torch_geometric.data.Batch``."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def clone(self):
        return Graph(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})


# ----------------------------------------------------------------------------------------------
# Model (ponita/nn/embedding.py, ponita/nn/conv.py, ponita/nn/convnext.py, ponita/models/ponita.py)
# ----------------------------------------------------------------------------------------------


class PolynomialFeatures(nn.Module):
    """[x, x(x)x, x(x)x(x)x] flattened, i.e. degree 3 -> 2 + 4 + 8 = 14 features for 2-d input."""

    def __init__(self, degree):
        super().__init__()
        self.degree = degree

    def forward(self, x):
        polys = [x]
        for _ in range(1, self.degree):
            polys.append(torch.einsum("...i,...j->...ij", polys[-1], x).flatten(-2, -1))
        return torch.cat(polys, -1)

    @staticmethod
    def out_dim(in_dim, degree):
        return sum(in_dim ** d for d in range(1, degree + 1))


class PolynomialCutoff(nn.Module):
    """DimeNet envelope (p = 6); radius None -> window of ones (the rMD17 / N-body defaults)."""

    def __init__(self, radius, p=6):
        super().__init__()
        self.radius, self.p = radius, p

    def forward(self, dist):
        if self.radius is None:
            return torch.ones_like(dist)
        p = self.p
        d = dist / self.radius
        out = 1.0 - (p + 1.0) * (p + 2.0) / 2.0 * d ** p + p * (p + 2.0) * d ** (p + 1) - p * (p + 1.0) / 2.0 * d ** (p + 2)
        return out * (d < 1.0)


class FiberBundleConv(nn.Module):
    """Separable depthwise fibre-bundle convolution (official FiberBundleConv, separable, groups=C)."""

    def __init__(self, channels, attr_dim, bias=True):
        super().__init__()
        self.kernel = nn.Linear(attr_dim, channels, bias=False)  # spatial kernel  [E, O, C]
        self.fiber_kernel = nn.Linear(attr_dim, channels, bias=False)  # C*C/groups = C  [O, O, C]
        if bias:
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("callibrated", torch.tensor(False))

    def forward(self, x, edge_index, edge_attr, fiber_attr):
        kernel = self.kernel(edge_attr)  # [E, O, C]
        # PyG propagate (flow source_to_target, node_dim=0): gather x_j, message, scatter-sum.
        x_j = x.index_select(0, edge_index[0])  # [E, O, C]
        msg = kernel * x_j
        x_1 = scatter_sum(msg, edge_index[1], x.shape[0])  # [N, O, C]
        fiber_kernel = self.fiber_kernel(fiber_attr)  # [O, O, C]
        x_2 = torch.einsum("boc,opc->bpc", x_1, fiber_kernel) / fiber_kernel.shape[-2]
        if self.training and not bool(self.callibrated):
            self.callibrate(x.std(), x_1.std(), x_2.std())
        if self.bias is not None:
            return x_2 + self.bias
        return x_2

    def callibrate(self, std_in, std_1, std_2):
        with torch.no_grad():
            self.kernel.weight.data = self.kernel.weight.data * std_in / std_1
            self.fiber_kernel.weight.data = self.fiber_kernel.weight.data * std_1 / std_2
            self.callibrated = ~self.callibrated


class ConvNext(nn.Module):
    def __init__(self, channels, conv, act, layer_scale=None, widening_factor=4):
        super().__init__()
        self.conv = conv
        self.act_fn = act
        self.linear_1 = nn.Linear(channels, widening_factor * channels)
        self.linear_2 = nn.Linear(widening_factor * channels, channels)
        if layer_scale is not None:
            self.layer_scale = nn.Parameter(torch.ones(channels) * layer_scale)
        else:
            self.register_buffer("layer_scale", None)
        self.norm = nn.LayerNorm(channels)  # eps 1e-5

    def forward(self, x, edge_index, edge_attr, fiber_attr):
        inp = x
        x = self.conv(x, edge_index, edge_attr, fiber_attr)
        x = self.norm(x)
        x = self.linear_1(x)
        x = self.act_fn(x)
        x = self.linear_2(x)
        if self.layer_scale is not None:
            x = self.layer_scale * x
        if inp.shape == x.shape:
            x = x + inp
        return x


class PonitaFiberBundle(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers, output_dim_vec=0, radius=None,
                 num_ori=20, basis_dim=None, degree=3, widening_factor=4, layer_scale=None,
                 task_level="graph", multiple_readouts=True):
        super().__init__()
        self.output_dim, self.output_dim_vec = output_dim, output_dim_vec
        self.global_pooling = task_level == "graph"
        self.num_ori = num_ori
        self.register_buffer("ori_grid", fibonacci_grid_s2(num_ori))

        act_fn = nn.GELU()  # exact erf GELU, shared module as in the official code
        basis_dim = hidden_dim if basis_dim is None else basis_dim
        spatial_in = PolynomialFeatures.out_dim(2, degree)
        fiber_in = PolynomialFeatures.out_dim(1, degree)
        self.basis_fn = nn.Sequential(PolynomialFeatures(degree), nn.Linear(spatial_in, hidden_dim), act_fn,
                                      nn.Linear(hidden_dim, basis_dim), act_fn)
        self.fiber_basis_fn = nn.Sequential(PolynomialFeatures(degree), nn.Linear(fiber_in, hidden_dim), act_fn,
                                            nn.Linear(hidden_dim, basis_dim), act_fn)
        self.windowing_fn = PolynomialCutoff(radius)
        self.x_embedder = nn.Linear(input_dim, hidden_dim, bias=False)

        self.interaction_layers = nn.ModuleList()
        self.read_out_layers = nn.ModuleList()
        for i in range(num_layers):
            conv = FiberBundleConv(hidden_dim, basis_dim)
            self.interaction_layers.append(ConvNext(hidden_dim, conv, act=act_fn, layer_scale=layer_scale,
                                                    widening_factor=widening_factor))
            if multiple_readouts or i == num_layers - 1:
                self.read_out_layers.append(nn.Linear(hidden_dim, output_dim + output_dim_vec))
            else:
                self.read_out_layers.append(None)

    # --- PositionOrientationGraph(num_ori) + SEnInvariantAttributes(separable=True) -------------
    def transform(self, graph):
        ori_grid = self.ori_grid.type_as(graph.pos)
        inputs = []
        if getattr(graph, "x", None) is not None:
            inputs.append(scalar_to_sphere(graph.x, ori_grid))
        if getattr(graph, "vec", None) is not None:
            inputs.append(vec_to_sphere(graph.vec, ori_grid))
        f = torch.cat(inputs, dim=-1)  # [N, O, C_in]
        num_nodes = graph.pos.shape[0]
        edge_index = coalesce(add_self_loops(graph.edge_index, num_nodes), num_nodes)

        pos = graph.pos
        # invariant_attr_r3
        dists = (pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=-1, keepdim=True)  # [E, 1]
        # invariant_attr_r3s2_fiber_bundle(separable=True)
        pos_send, pos_receive = pos[edge_index[0]], pos[edge_index[1]]
        rel_pos = (pos_send - pos_receive)[:, None, :]  # [E, 1, 3]
        ori_a = ori_grid[None, :, :]  # [1, O, 3]
        ori_b = ori_grid[:, None, :]  # [O, 1, 3]
        inv1 = (rel_pos * ori_a).sum(dim=-1, keepdim=True)  # [E, O, 1]
        inv2 = (rel_pos - inv1 * ori_a).norm(dim=-1, keepdim=True)  # [E, O, 1]
        inv3 = (ori_a * ori_b).sum(dim=-1, keepdim=True)  # [O, O, 1]
        attr = torch.cat([inv1, inv2], dim=-1)  # [E, O, 2]
        return f, edge_index, attr, inv3, dists, ori_grid

    def forward(self, graph):
        f, edge_index, attr, fiber_attr, dists, ori_grid = self.transform(graph)
        kernel_basis = self.basis_fn(attr) * self.windowing_fn(dists).unsqueeze(-2)  # [E, O, K]
        fiber_kernel_basis = self.fiber_basis_fn(fiber_attr)  # [O, O, K]
        x = self.x_embedder(f)  # [N, O, C]
        readouts = []
        for layer, readout in zip(self.interaction_layers, self.read_out_layers):
            x = layer(x, edge_index, kernel_basis, fiber_kernel_basis)
            if readout is not None:
                readouts.append(readout(x))
        readout = sum(readouts) / len(readouts)
        r_scalar, r_vec = torch.split(readout, [self.output_dim, self.output_dim_vec], dim=-1)
        out_scalar = out_vec = None
        if self.output_dim > 0:
            out_scalar = sphere_to_scalar(r_scalar)
            if self.global_pooling:
                out_scalar = global_add_pool(out_scalar, graph.batch, graph.num_graphs)
        if self.output_dim_vec > 0:
            out_vec = sphere_to_vec(r_vec, ori_grid)
            if self.global_pooling:
                out_vec = global_add_pool(out_vec, graph.batch, graph.num_graphs)
        return out_scalar, out_vec


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Optimiser set-up of the Lightning wrappers (decay / no-decay groups, Adam) + EMA
# ----------------------------------------------------------------------------------------------


def make_optimizer(model, lr, weight_decay):
    decay, no_decay = set(), set()
    for mn, m in model.named_modules():
        for pn, _ in m.named_parameters(recurse=False):
            fpn = f"{mn}.{pn}" if mn else pn
            if pn.endswith("bias"):
                no_decay.add(fpn)
            elif pn.endswith("weight") and isinstance(m, nn.Linear):
                decay.add(fpn)
            elif pn.endswith("weight") and isinstance(m, (nn.LayerNorm, nn.Embedding)):
                no_decay.add(fpn)
            elif pn.endswith("layer_scale"):
                no_decay.add(fpn)
    params = dict(model.named_parameters())
    assert not (decay & no_decay) and set(params) == decay | no_decay
    groups = [
        {"params": [params[n] for n in sorted(decay)], "weight_decay": weight_decay},
        {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.Adam(groups, lr=lr)


class EMA:
    """EMAOptimizer.update of lightning_wrappers/callbacks.py (foreach mul + add)."""

    def __init__(self, model, decay=0.99):
        self.decay = decay
        self.params = [p for p in model.parameters()]
        self.ema = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        cur = [p.data for p in self.params]
        torch._foreach_mul_(self.ema, self.decay)
        torch._foreach_add_(self.ema, cur, alpha=1.0 - self.decay)


# ----------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------

ASPIRIN_Z = [6, 6, 6, 6, 6, 6, 6, 8, 8, 8, 6, 6, 8, 1, 1, 1, 1, 1, 1, 1, 1]  # C9 H8 O4, 21 atoms


def fully_connected_edges(n_per_graph, num_graphs, loop=True):
    """RadiusGraph(r = 1000, loop=True) on small molecules == fully connected + self loops."""
    ar = torch.arange(n_per_graph)
    src, dst = torch.meshgrid(ar, ar, indexing="ij")
    src, dst = src.reshape(-1), dst.reshape(-1)
    if not loop:
        keep = src != dst
        src, dst = src[keep], dst[keep]
    offs = (torch.arange(num_graphs) * n_per_graph).repeat_interleave(src.numel())
    return torch.stack([src.repeat(num_graphs) + offs, dst.repeat(num_graphs) + offs])


def make_rmd17_batch(batch_size, gen):
    n = len(ASPIRIN_Z)
    z = torch.tensor(ASPIRIN_Z * batch_size)
    pos = torch.randn(batch_size * n, 3, generator=gen) * 1.5
    return Graph(
        pos=pos,
        x=torch.nn.functional.one_hot(z, 9).float(),
        vec=None,
        edge_index=fully_connected_edges(n, batch_size),
        batch=torch.arange(batch_size).repeat_interleave(n),
        num_graphs=batch_size,
        energy=torch.randn(batch_size, generator=gen) * 10.0,
        force=torch.randn(batch_size * n, 3, generator=gen) * 30.0,
    )


def make_nbody_batch(batch_size, gen):
    n = 5
    charges = (torch.randint(0, 2, (batch_size * n, 1), generator=gen) * 2 - 1).float()
    pos = torch.randn(batch_size * n, 3, generator=gen)
    vel = torch.randn(batch_size * n, 3, generator=gen)
    vel = 0.5 * vel / vel.norm(dim=-1, keepdim=True)
    return Graph(
        pos=pos,
        x=charges,
        vec=vel[:, None, :],
        edge_index=fully_connected_edges(n, batch_size),
        batch=torch.arange(batch_size).repeat_interleave(n),
        num_graphs=batch_size,
        y=pos + vel + 0.05 * torch.randn(batch_size * n, 3, generator=gen),
    )


WORKLOADS = {
    # main_md17.py defaults (revised aspirin)
    "rmd17": dict(batch_size=5, input_dim=9, hidden_dim=128, basis_dim=256, layers=5, num_ori=20, degree=3,
                  widening_factor=4, layer_scale=None, output_dim=1, output_dim_vec=0, task_level="graph",
                  lr=5e-4, weight_decay=1e-16, lambda_F=500.0, clip=0.5, ema=0.99),
    # main_nbody.py defaults (nbody_small)
    "nbody": dict(batch_size=100, input_dim=2, hidden_dim=128, basis_dim=256, layers=5, num_ori=16, degree=3,
                  widening_factor=4, layer_scale=1e-6, output_dim=0, output_dim_vec=1, task_level="node",
                  lr=1e-3, weight_decay=1e-10, clip=0.5, ema=None),
}


def build(workload, batch_size=None, seed=0):
    cfg = dict(WORKLOADS[workload])
    if batch_size is not None:
        cfg["batch_size"] = batch_size
    torch.manual_seed(seed)
    model = PonitaFiberBundle(cfg["input_dim"], cfg["hidden_dim"], cfg["output_dim"], cfg["layers"],
                              output_dim_vec=cfg["output_dim_vec"], radius=None, num_ori=cfg["num_ori"],
                              basis_dim=cfg["basis_dim"], degree=cfg["degree"],
                              widening_factor=cfg["widening_factor"], layer_scale=cfg["layer_scale"],
                              task_level=cfg["task_level"], multiple_readouts=True)
    gen = torch.Generator().manual_seed(seed + 1)
    make = make_rmd17_batch if workload == "rmd17" else make_nbody_batch
    batch = make(cfg["batch_size"], gen)
    return cfg, model, batch


def rotate_graph(graph, keys, gen):
    rot = random_rotation_matrix(gen, graph.pos.dtype)
    g = Graph(**graph.__dict__)
    for k in keys:
        v = getattr(graph, k)
        setattr(g, k, torch.einsum("ij,...j->...i", rot, v))
    return g


# --- rMD17 (lightning_wrappers/md17.py) --------------------------------------------------------


def md17_energy(model, graph):
    pred, _ = model(graph)
    return pred.squeeze(-1)


def md17_energy_and_force(model, graph, create_graph=True):
    with torch.enable_grad():
        pos = graph.pos.detach().requires_grad_(True)
        g = Graph(**graph.__dict__)
        g.pos = pos
        energy = md17_energy(model, g)
        force = -torch.autograd.grad(energy, pos, grad_outputs=torch.ones_like(energy),
                                     create_graph=create_graph, retain_graph=True)[0]
    return energy, force


def make_train_step(workload, cfg, model, extras=True, seed=0):
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"])
    ema = EMA(model, cfg["ema"]) if (extras and cfg.get("ema")) else None
    gen = torch.Generator().manual_seed(seed + 2)
    shift, scale = 0.0, 1.0  # dataset statistics: constants, irrelevant for timing

    def step(graph):
        model.train()
        opt.zero_grad(set_to_none=True)
        if workload == "rmd17":
            if extras:
                graph = rotate_graph(graph, ["pos", "force"], gen)
            energy, force = md17_energy_and_force(model, graph, create_graph=True)
            e_loss = torch.mean((energy - (graph.energy - shift) / scale) ** 2)
            f_loss = torch.mean(torch.sum((force - graph.force / scale) ** 2, -1)) / 3.0
            loss = e_loss / cfg["lambda_F"] + f_loss
        else:
            if extras:
                graph = rotate_graph(graph, ["pos", "vec", "y"], gen)
            _, pred = model(graph)
            pos_pred = graph.pos + pred[..., 0, :]
            loss = torch.mean((pos_pred - graph.y) ** 2)
        loss.backward()
        if extras:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        if ema is not None:
            ema.update()
        return loss.detach()

    return step


def make_inference_fns(workload, model):
    def forward_only(graph):
        model.eval()
        with torch.no_grad():
            s, v = model(graph)
        return s if s is not None else v

    fns = {"forward": forward_only}
    if workload == "rmd17":
        def forward_forces(graph):
            # Validation/test path of the official wrapper: pred_energy_and_force with create_graph=True.
            model.eval()
            e, f = md17_energy_and_force(model, graph, create_graph=True)
            return f.detach()
        fns["forward+forces"] = forward_forces
    return fns


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _cpu_jiffies():
    """(busy, total) jiffies over all CPUs from /proc/stat (Linux); None elsewhere."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


class LoadMonitor:
    """Fraction of the machine's CPU time used by *other* processes during a measurement.

    Tiny CPU kernels (the official fibre-step einsum becomes 128-way batched 20x20 bmm calls,
    each its own OpenMP region) are extremely sensitive to oversubscription, so every record
    carries this contamination indicator."""

    def __enter__(self):
        self.j0, self.c0, self.t0 = _cpu_jiffies(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        j1, c1, t1 = _cpu_jiffies(), time.process_time(), time.perf_counter()
        self.other_cpu_frac = None
        if self.j0 is not None and j1 is not None and j1[1] > self.j0[1]:
            hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            ncpu = os.cpu_count() or 1
            busy = (j1[0] - self.j0[0]) / hz
            own = c1 - self.c0
            self.other_cpu_frac = max(0.0, (busy - own) / ((t1 - self.t0) * ncpu))
        return False


def wait_for_idle(max_wait_s, window_s=3.0, threshold=0.10):
    """Wait (at most max_wait_s) for a window in which other processes use < threshold of the CPUs."""
    t_end = time.perf_counter() + max_wait_s
    while True:
        j0 = _cpu_jiffies()
        if j0 is None:
            return None
        time.sleep(window_s)
        j1 = _cpu_jiffies()
        frac = (j1[0] - j0[0]) / max(1, (j1[1] - j0[1]))
        if frac < threshold or time.perf_counter() > t_end:
            return frac


def time_fn(fn, arg, warmup, steps):
    for _ in range(warmup):
        out = fn(arg)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = fn(arg)
        if torch.is_tensor(out):
            out = out.sum().item()  # CPU ops are synchronous; this only forces materialisation
        times.append((time.perf_counter() - t0) * 1e3)
    return times, out


def pct(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def record(args, cfg, what, variant, times, params, extras, mon=None):
    med = statistics.median(times)
    return {
        "impl": "pytorch-port",
        "method": "ponita",
        "workload": args.workload,
        "what": what,
        "variant": variant,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "step_ms_median": round(med, 3),
        "step_ms_p10": round(pct(times, 0.1), 3),
        "step_ms_p90": round(pct(times, 0.9), 3),
        "examples_per_s": round(cfg["batch_size"] / (med / 1e3), 3),
        "params": params,
        "batch_size": cfg["batch_size"],
        "steps": len(times),
        "warmup": args.warmup,
        "dtype": "float32",
        "official_step_extras": extras,
        "other_cpu_frac": None if mon is None or mon.other_cpu_frac is None else round(mon.other_cpu_frac, 3),
        "loadavg_1min_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }


def self_test():
    """Cheap correctness checks of the port (not timing): parameter counts, scatter/coalesce
    helpers, forces = -dE/dx by central finite differences (float64), rotation invariance of the
    energy when the grid is rotated along with the input, and finiteness of a second-order step."""
    torch.set_default_dtype(torch.float32)
    cfg, model, _ = build("rmd17")
    assert count_params(model) == 1_058_437, count_params(model)
    breakdown = {
        "basis_fn": sum(p.numel() for p in model.basis_fn.parameters()),
        "fiber_basis_fn": sum(p.numel() for p in model.fiber_basis_fn.parameters()),
        "x_embedder": model.x_embedder.weight.numel(),
        "block": sum(p.numel() for p in model.interaction_layers[0].parameters()),
        "readouts": sum(p.numel() for m in model.read_out_layers for p in m.parameters()),
    }
    assert breakdown == {"basis_fn": 34944, "fiber_basis_fn": 33536, "x_embedder": 1152, "block": 197632,
                         "readouts": 645}, breakdown
    ei = torch.tensor([[0, 1, 1, 2], [1, 0, 0, 2]])
    assert coalesce(add_self_loops(ei, 3), 3).tolist() == [[0, 0, 1, 1, 2], [0, 1, 0, 1, 2]]
    out = scatter_sum(torch.ones(4, 2, 3), torch.tensor([0, 2, 2, 2]), 3)
    assert out[:, 0, 0].tolist() == [1.0, 0.0, 3.0]

    # small float64 model for the finite-difference check
    torch.manual_seed(0)
    small = PonitaFiberBundle(9, 16, 1, 2, num_ori=8, basis_dim=16, task_level="graph").double()
    gen = torch.Generator().manual_seed(3)
    g = make_rmd17_batch(2, gen)
    g.pos, g.x = g.pos.double(), g.x.double()
    small.eval()
    e, f = md17_energy_and_force(small, g, create_graph=False)
    h, (i, k) = 1e-5, (4, 1)
    gp, gm = g.clone(), g.clone()
    gp.pos[i, k] += h
    gm.pos[i, k] -= h
    with torch.no_grad():
        fd = -(md17_energy(small, gp).sum() - md17_energy(small, gm).sum()) / (2 * h)
    assert abs(fd.item() - f[i, k].item()) < 1e-6 * max(1.0, abs(fd.item())), (fd.item(), f[i, k].item())
    # exact invariance when grid and input are rotated together
    rot = random_rotation_matrix(gen, torch.float64)
    gr = g.clone()
    gr.pos = g.pos @ rot.T
    small.ori_grid = small.ori_grid @ rot.T
    with torch.no_grad():
        er = md17_energy(small, gr)
    assert torch.allclose(er, e.detach(), rtol=1e-9, atol=1e-9), (er, e)
    # one second-order training step stays finite (self loops give rel = 0 and a2 = 0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for wl in ("rmd17", "nbody"):
        cfg, model, batch = build(wl, batch_size=2)
        loss = make_train_step(wl, cfg, model)(batch)
        assert math.isfinite(loss.item()), (wl, loss)
        assert all(torch.isfinite(p).all() for p in model.parameters()), wl
    print("[ponita-torch] self-test passed:", breakdown)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS))
    ap.add_argument("--self-test", action="store_true", help="run correctness checks and exit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--inference-steps", type=int, default=None, help="default: same as --steps")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minimal", action="store_true",
                    help="time only forward/forces/backward/Adam (no augmentation, clipping, EMA)")
    ap.add_argument("--skip-inference", action="store_true")
    ap.add_argument("--out", default=None, help="append one JSON object per measurement")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each measurement wait up to SECONDS for a quiet machine (<10%% CPU busy)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.self_test:
        self_test()
        return []
    if args.workload is None:
        ap.error("--workload is required")
    torch.set_default_dtype(torch.float32)
    extras = not args.minimal

    cfg, model, batch = build(args.workload, args.batch_size, args.seed)
    params = count_params(model)
    print(f"[ponita-torch] workload={args.workload} params={params:,} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} batch={cfg['batch_size']} extras={extras}", flush=True)
    if args.workload == "rmd17" and cfg["batch_size"] == 5:
        assert params == 1_058_437, f"rMD17 default parameter count {params} != 1,058,437"

    records = []
    step = make_train_step(args.workload, cfg, model, extras=extras, seed=args.seed)
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    with LoadMonitor() as mon:
        times, loss = time_fn(step, batch, args.warmup, args.steps)
    assert math.isfinite(loss), f"non-finite loss {loss}"
    rec = record(args, cfg, "train_step", "official" if extras else "minimal", times, params, extras, mon)
    records.append(rec)
    print(f"  train_step: median {rec['step_ms_median']:.1f} ms  p10 {rec['step_ms_p10']:.1f}  "
          f"p90 {rec['step_ms_p90']:.1f}  ({rec['examples_per_s']:.1f} ex/s, final loss {loss:.4g}, "
          f"other-process CPU {rec['other_cpu_frac']})", flush=True)

    if not args.skip_inference:
        n_inf = args.inference_steps or args.steps
        for variant, fn in make_inference_fns(args.workload, model).items():
            if args.wait_idle > 0:
                wait_for_idle(args.wait_idle)
            with LoadMonitor() as mon:
                times, _ = time_fn(fn, batch, args.warmup, n_inf)
            rec = record(args, cfg, "inference", variant, times, params, extras, mon)
            records.append(rec)
            print(f"  inference[{variant}]: median {rec['step_ms_median']:.1f} ms  p10 {rec['step_ms_p10']:.1f}  "
                  f"p90 {rec['step_ms_p90']:.1f}  ({rec['examples_per_s']:.1f} ex/s, other-process CPU "
                  f"{rec['other_cpu_frac']})", flush=True)

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
