"""One-line integrations with the training frameworks users already run.

Each module imports its framework, so import the one you use (each is an optional extra):

* :mod:`auxgen.integrations.lightning`: :class:`~auxgen.integrations.lightning.MetaStep`, a
  callback that runs MAXL's meta-update under Lightning's automatic optimisation
  (``pip install "auxgen[lightning]"``);
* :mod:`auxgen.integrations.hf`: :class:`~auxgen.integrations.hf.AuxiliaryTrainer`, a
  Hugging Face ``transformers.Trainer`` that trains an :class:`~auxgen.AuxiliaryLabeler`
  (``pip install "auxgen[transformers]"``);
* :mod:`auxgen.integrations.timm`: :class:`~auxgen.integrations.timm.AuxiliaryTrainingTask`,
  a task in the shape of ``timm.task`` (``task(input, target)["loss"]``).

Plain PyTorch, Accelerate and ``DistributedDataParallel`` need no integration: ``loss =
labeler(x, y)["loss"]`` is an ordinary loss (see the README's table).
"""

from ..loop import ignore_meta_parameters, unwrap_optimizer

__all__ = ["ignore_meta_parameters", "unwrap_optimizer"]
