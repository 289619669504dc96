"""Saved heads and prediction on new cells: ``scdrugmap fit``, ``models`` and ``predict``."""

from .models import fit_model, list_models, load_model
from .predict import predict, summarise

__all__ = ["fit_model", "list_models", "load_model", "predict", "summarise"]
