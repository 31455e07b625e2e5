"""ConceptSplit algorithms in plain torch (ToVA, LODA, attention maps, training). Never imports ComfyUI."""

from .errors import ConceptSplitError

__all__ = ["ConceptSplitError"]
