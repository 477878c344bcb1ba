"""A model handed to the Python API in training mode (its factory never called eval()) gave maps that
changed from call to call (dropout) and with the batch (batch norm), silently: the API now says so."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from saliency_audit.explainers import get_explainer


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(4 * 8 * 8, 3))


def test_a_model_in_training_mode_is_named_in_a_warning():
    with pytest.warns(UserWarning, match="grad: the model's dropout or batch norm layers are in training mode"):
        get_explainer("grad", model().train())


def test_a_model_in_eval_mode_draws_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explanation = get_explainer("grad", model().eval()).explain(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
    assert torch.isfinite(explanation.maps).all()
