"""Avalanche EWCPlugin, re-implemented from avalanche-lib 0.6.0 source, for benchmarks/bench_ewc.py.

Read from the avalanche-lib 0.6.0 wheel (``pip download avalanche-lib==0.6.0 --no-deps``):
``avalanche/training/plugins/ewc.py`` (``EWCPlugin.before_backward``) and ``avalanche/training/utils.py``
(``ParamData``, ``copy_params_dict``). The package is not installed: its requirements pull in wandb,
tensorboard, torchvision, torchmetrics, scikit-learn, pytorchcv, qpsolvers, gdown and more, far beyond what
the penalty needs. What runs here is the same per-step code path:

* the saved parameters and importances are ``ParamData`` objects (``{experience: {name: ParamData}}``), and
  every step calls ``ParamData.expand(cur_param.shape)`` on both (shape checks in Python; no copy when the
  shape is unchanged), as Avalanche does to support growing heads;
* ``before_backward`` in ``mode="separate"``: ``penalty = torch.tensor(0).float().to(device)``, then for every
  earlier experience and every ``model.named_parameters()`` entry present in that experience,
  ``penalty += (imp.expand(shape) * (cur_param - saved.expand(shape)).pow(2)).sum()``, and
  ``strategy.loss += ewc_lambda * penalty``;
* the strategy's backward: ``strategy.loss.backward()``, accumulating into the existing ``.grad``.

Avalanche's penalty has no 1/2: ``ewc_lambda * sum F d^2`` equals forgetkern's ``lam / 2 * sum F d^2`` with
``lam = 2 * ewc_lambda``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, Optional, Union

import torch


class ParamData:
    """avalanche.training.utils.ParamData (0.6.0): a tensor that can be expanded along one dimension."""

    def __init__(self, name: str, shape: Optional[tuple] = None,
                 init_function: Callable[[torch.Size], torch.Tensor] = torch.zeros,
                 init_tensor: Union[torch.Tensor, None] = None, device: Union[str, torch.device] = "cpu"):
        assert isinstance(name, str)
        assert (init_tensor is not None) or (shape is not None)
        if init_tensor is not None and shape is not None:
            assert init_tensor.shape == shape
        self.init_function = init_function
        self.name = name
        if shape is not None:
            self.shape = torch.Size(shape)
        else:
            assert init_tensor is not None
            self.shape = init_tensor.size()
        self.device = torch.device(device)
        if init_tensor is not None:
            self._data: torch.Tensor = init_tensor
        else:
            self.reset_like()

    def reset_like(self, shape=None, init_function=None):
        if shape is not None:
            self.shape = torch.Size(shape)
        if init_function is None:
            init_function = self.init_function
        self._data = init_function(self.shape).to(self.device)

    def expand(self, new_shape, padding_fn=torch.zeros):
        assert len(new_shape) == len(self.shape), "Expansion cannot add new dimensions"
        expanded = False
        for i, (snew, sold) in enumerate(zip(new_shape, self.shape)):
            assert snew >= sold, "Shape cannot decrease."
            if snew > sold:
                assert not expanded, "Expansion cannot occur in more than one dimension."
                expanded = True
                exp_idx = i
        if expanded:
            old_data = self._data.clone()
            old_shape_len = self._data.shape[exp_idx]
            self.reset_like(new_shape, init_function=padding_fn)
            idx = [slice(el) if i != exp_idx else slice(old_shape_len) for i, el in enumerate(new_shape)]
            self._data[idx] = old_data
        return self.data

    @property
    def data(self) -> torch.Tensor:
        return self._data


class EWCPluginPenalty:
    """The per-step part of avalanche.training.plugins.EWCPlugin (0.6.0), mode "separate".

    ``saved_params[e][name]`` / ``importances[e][name]``: ``ParamData`` of experience ``e`` (in Avalanche
    filled by ``after_training_exp`` with ``copy_params_dict(model)`` and ``compute_importances``; here given:
    the benchmark's anchors and Fishers, wrapped without a copy)."""

    def __init__(self, ewc_lambda: float, saved_params: Dict[int, Dict[str, ParamData]],
                 importances: Dict[int, Dict[str, ParamData]]):
        self.ewc_lambda = ewc_lambda
        self.mode = "separate"
        self.saved_params = defaultdict(dict, saved_params)
        self.importances = defaultdict(dict, importances)

    def before_backward(self, model: torch.nn.Module, loss: torch.Tensor, exp_counter: int,
                        device) -> torch.Tensor:
        """Returns ``strategy.loss`` after ``strategy.loss += self.ewc_lambda * penalty``."""
        if exp_counter == 0:
            return loss
        penalty = torch.tensor(0).float().to(device)
        for experience in range(exp_counter):
            for k, cur_param in model.named_parameters():
                # new parameters do not count
                if k not in self.saved_params[experience]:
                    continue
                saved_param = self.saved_params[experience][k]
                imp = self.importances[experience][k]
                new_shape = cur_param.shape
                penalty += (imp.expand(new_shape) * (cur_param - saved_param.expand(new_shape)).pow(2)).sum()
        loss += self.ewc_lambda * penalty
        return loss


def make_plugin(model: torch.nn.Module, anchors, fishers, ewc_lambda: float) -> EWCPluginPenalty:
    """One earlier experience whose saved parameters / importances are ``anchors`` / ``fishers`` (in
    ``model.named_parameters()`` order)."""
    names = [k for k, _ in model.named_parameters()]
    device = next(model.parameters()).device
    saved = {k: ParamData(k, a.shape, device=device, init_tensor=a) for k, a in zip(names, anchors)}
    imp = {k: ParamData(f"imp_{k}", f.shape, device=device, init_tensor=f) for k, f in zip(names, fishers)}
    return EWCPluginPenalty(ewc_lambda, {0: saved}, {0: imp})


def plugin_step(plugin: EWCPluginPenalty, model: torch.nn.Module, device) -> torch.Tensor:
    """The step as a strategy runs it: the task loss (here 0) plus the plugin's penalty, then backward."""
    loss = torch.zeros((), device=device)
    loss = plugin.before_backward(model, loss, exp_counter=1, device=device)
    loss.backward()
    return loss.detach()
