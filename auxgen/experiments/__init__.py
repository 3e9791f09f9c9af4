"""The experiment harness: reproduces the MAXL paper's comparisons on top of the library.

Nothing in the library (:mod:`auxgen` and its core modules) imports this package. Modules:

* :mod:`~auxgen.experiments.config`: :class:`RunConfig`, its validation, method names.
* :mod:`~auxgen.experiments.hierarchies`: CIFAR-100's class hierarchy, coarse groupings.
* :mod:`~auxgen.experiments.datasets`: loading a run's data and its splits.
* :mod:`~auxgen.experiments.cifar`: CIFAR-100 / CIFAR-10 files (torchvision's format).
* :mod:`~auxgen.experiments.augment`: batched crop-and-flip, a tensor image dataset.
* :mod:`~auxgen.experiments.baselines`: human, random and k-means auxiliary labels.
* :mod:`~auxgen.experiments.models`: the small CNN and MLP, timm / torchvision backbones.
* :mod:`~auxgen.experiments.batches`: the per-epoch batch stream.
* :mod:`~auxgen.experiments.training`: :func:`train`, the loop of one run.
* :mod:`~auxgen.experiments.evaluation`: accuracy, NMI analysis of the auxiliary labels.
* :mod:`~auxgen.experiments.checkpoints`: resuming and saving a run.
* :mod:`~auxgen.experiments.runtime`: device, seeds, ranks, atomic JSON output.
* :mod:`~auxgen.experiments.sweep`: methods x seeds, summaries, tables, the digits demo.
* :mod:`~auxgen.experiments.plots`: the figures.
"""
