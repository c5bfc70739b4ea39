"""Exceptions raised by the LoRA core (kept torch-free so importing them is cheap)."""

from __future__ import annotations


class LoraConfigError(ValueError):
    """A LoRA setting is invalid, or no module of the model can take the adapter as configured."""


class AdapterLoadError(RuntimeError):
    """An adapter folder cannot be loaded onto this model; the model was left unchanged."""


class FingerprintMismatchError(AdapterLoadError):
    """The adapter was trained on a different base model (pass `force=True` to load it anyway)."""
