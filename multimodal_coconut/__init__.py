"""Multimodal CoCoNuT: Coconut's continuous thoughts on InternVL3 for visual question answering.

Heavy imports (torch, transformers) are deferred, so `multimodal_coconut.config` validates a config in milliseconds.
"""

__version__ = "0.1.0"
__all__ = ["Backbone", "CoconutOutput", "MultimodalCoconut", "load_backbone"]


def __getattr__(name):
    if name in ("Backbone", "load_backbone"):
        from . import backbone

        return getattr(backbone, name)
    if name in ("CoconutOutput", "MultimodalCoconut"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'multimodal_coconut' has no attribute {name!r}")
