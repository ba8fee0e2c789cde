"""Device mesh, data-parallel shardings and host-to-device batch placement.

Every method trains data-parallel over one mesh axis named ``data``. The same code runs on one CPU, all
devices of one host, or several hosts started with ``jax.distributed``: each process holds the full global
batch on the host (batches are built deterministically from the step number), keeps the rows that belong to
its own devices, and ``jax.make_array_from_process_local_data`` assembles the global array.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
  """Joins a multi-process job when the standard variables ask for one.

  ``JAXLAB_COORDINATOR=host:port``, ``JAXLAB_NUM_PROCESSES`` and ``JAXLAB_PROCESS_ID`` select
  ``jax.distributed.initialize`` explicitly; CPU runs use gloo collectives so localhost jobs work too.
  """
  coordinator = os.environ.get("JAXLAB_COORDINATOR")
  if not coordinator or jax.distributed.is_initialized():
    return
  try:
    num_processes = int(os.environ["JAXLAB_NUM_PROCESSES"])
    process_id = int(os.environ["JAXLAB_PROCESS_ID"])
  except (KeyError, ValueError) as e:
    raise ValueError(
        "JAXLAB_COORDINATOR is set, so JAXLAB_NUM_PROCESSES and JAXLAB_PROCESS_ID must be set to integers"
    ) from e
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)


def make_data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over all (or the first ``num_devices``) devices, with an Auto axis.

  Auto (not Explicit) axis types let gathers over batch-sharded arrays partition without annotations.
  """
  n = num_devices or jax.device_count()
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading axis split over ``data``; the remaining axes are whole on every device."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(batch_size: int, mesh: jax.sharding.Mesh, what: str = "batch_size") -> None:
  n = mesh.size
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} must be divisible by the number of devices ({n}) for data parallelism")


def put_global_batch(batch, mesh: jax.sharding.Mesh):
  """Places a host-side global batch (a pytree of numpy arrays, leading axis = examples) on the mesh.

  In a multi-process job every process passes the same global batch; each keeps only its own rows.
  """
  sharding = batch_sharded(mesh)

  def place(x):
    x = np.asarray(x)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    n_local = x.shape[0] // jax.process_count()
    start = jax.process_index() * n_local
    return jax.make_array_from_process_local_data(sharding, x[start:start + n_local], x.shape)

  return jax.tree.map(place, batch)


def put_replicated(tree, mesh: jax.sharding.Mesh):
  """Places a host-side pytree on every device; in a multi-process job every process passes the same values."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), tree)


def to_host(tree):
  """Fetches replicated device values to numpy, also when the array spans devices of other processes."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(fetch, tree)
