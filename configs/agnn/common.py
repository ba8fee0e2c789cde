"""Settings shared by the AGNN configs: child training, search, retraining and the NAS-Bench-Graph runs."""
import ml_collections


def controller_config() -> ml_collections.ConfigDict:
  # GraphNAS/AutoGL controller defaults; guide "sample" is AutoGL's default action guider (softmax over the
  # classes' decision entropies): "argmax" keeps mutating the one class whose entropy is largest
  return ml_collections.ConfigDict(dict(lstm_hidden=100, temperature=5.0, tanh_constant=2.5, learning_rate=3.5e-4,
                                        baseline_decay=0.95, entropy_coef=1e-4, guide="sample"))


def search_config(**overrides) -> ml_collections.ConfigDict:
  # max_minutes > 0 also ends the search after that much child training (the architectures are then fewer);
  # initial: AGNN's starting architecture A*, "" (random) or a handcrafted one ("gat", "gcn"), evaluated first
  s = ml_collections.ConfigDict(dict(strategy="agnn", budget=200, batch_size=1, seeds_per_child=2, sharing=False,
                                     num_layers=2, seed=0, max_minutes=0.0, initial=""))
  s.controller = controller_config()
  s.update(overrides)
  return s


def planetoid_config(name: str, arg=None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  c = ml_collections.ConfigDict()
  c.method = "agnn"
  c.task = "planetoid"
  c.variant = variant
  # how the seeds of one child share the device (child.train_children): "multi" (the layers' model axis),
  # "vmap" or "sequential"; all give the same result
  c.parallel = "multi"
  c.data = ml_collections.ConfigDict(dict(name=name, data_dir="", edge_multiple=1024))
  # GraphNAS/GAT child training; finetune_epochs only for children that inherit weights (search.sharing)
  c.child = ml_collections.ConfigDict(dict(epochs=200, learning_rate=0.005, weight_decay=5e-4, dropout=0.6,
                                           att_dropout=0.6, finetune_epochs=50, graphnas_compat=False))
  c.search = search_config()
  c.retrain = ml_collections.ConfigDict(dict(seeds=10))
  # gat_* = 0 keeps the child settings; Pubmed's GAT uses 8 output heads, lr 0.01 and L2 0.001
  c.baselines = ml_collections.ConfigDict(dict(run=True, seeds=10, gat_output_heads=1, gat_learning_rate=0.0,
                                               gat_weight_decay=0.0))
  if variant == "paper":
    c.search.update(budget=1000)
  elif variant == "sharing":
    c.search.update(sharing=True)
  elif variant == "random":
    c.search.update(strategy="random")
  elif variant == "cpu":
    # a 2-core CPU: one seed per child (the reward is noisier), at most an hour of search, and the explorer
    # starting from GAT, since an hour allows tens of architectures, not the thousand of a full search
    c.search.update(seeds_per_child=1, max_minutes=60.0, initial="gat")
  elif variant == "smoke":
    c.child.update(epochs=5, finetune_epochs=2)
    c.search.update(budget=4, batch_size=2, seeds_per_child=2)
    c.retrain.update(seeds=2)
    c.baselines.update(seeds=2)
  elif variant != "default":
    raise ValueError(f"unknown variant {variant!r}: use default, cpu, paper, sharing, random or smoke")
  return c
