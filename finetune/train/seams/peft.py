"""PEFT's private APIs used by finetune (bounded in pyproject.toml: peft>=0.17,<1).

`tests/test_seams.py` checks the patch against the installed PEFT.
"""

from __future__ import annotations

from typing import Any


def expose_token_wrapper_bias() -> None:
    """Let PEFT's trainable-token wrapper of an output layer answer `.bias` like the layer it wraps.

    TRL's fused LM head reads `lm_head.weight` and `lm_head.bias`; the wrapper answers `weight` (the merged
    matrix, through which the new rows get their gradients) but raises on `bias`. PEFT decides which
    attributes the wrapper forwards in its private `_hasattr_wrapped` / `_getattr_wrapped`, and offers no
    public way to forward another, so they are wrapped here (once per process).
    """
    from peft.utils.other import TrainableTokensWrapper

    if getattr(TrainableTokensWrapper, "_answers_bias", False):
        return
    has_wrapped, get_wrapped = TrainableTokensWrapper._hasattr_wrapped, TrainableTokensWrapper._getattr_wrapped

    def _hasattr(self: Any, name: str, modules: Any) -> bool:
        return name == "bias" or has_wrapped(self, name, modules)

    def _getattr(self: Any, name: str, modules: Any) -> Any:
        if name == "bias":
            return getattr(modules["token_adapter"].base_layer, "bias", None)
        return get_wrapped(self, name, modules)

    TrainableTokensWrapper._hasattr_wrapped = _hasattr
    TrainableTokensWrapper._getattr_wrapped = _getattr
    TrainableTokensWrapper._answers_bias = True
