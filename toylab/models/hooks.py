"""Named hook points (TransformerLens style) and activation caching.

A `HookPoint` is an identity module placed around every activation worth reading. Its name
is its path in the model (`blocks.0.hook_resid_pre`, `blocks.1.mlp.hook_expert_indices`, ...).
`HookedModule.run_with_cache` runs the model and returns the activations asked for.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from toylab.errors import ToylabError

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]


class HookPoint(nn.Module):
    """Identity module marking an activation; forward hooks read or replace it."""

    name: str = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def active(self) -> bool:
        """Whether a hook reads or replaces this activation now (lets a model skip computing it otherwise)."""
        return bool(self._forward_hooks)


class HookedModule(nn.Module):
    """Base for models with hook points: names them and runs with caches or hooks."""

    def setup_hooks(self) -> None:
        """Give every hook point its dotted name; call at the end of `__init__`."""
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def _select(self, names: str | Iterable[str] | None) -> list[str]:
        """Hook names matching exact names or glob patterns (`blocks.*.hook_resid_mid`)."""
        if names is None:
            return self.hook_names()
        patterns = [names] if isinstance(names, str) else list(names)
        selected = []
        for pattern in patterns:
            found = [n for n in self.hook_dict if fnmatch.fnmatchcase(n, pattern)]
            if not found:
                raise ToylabError(f"no hook point matches '{pattern}'; valid: {', '.join(self.hook_dict)}")
            selected += [n for n in found if n not in selected]
        return selected

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str, HookFn]]) -> Iterator[None]:
        """Temporarily attach `(name or pattern, fn(activation, hook))` forward hooks."""
        handles = []
        try:
            for pattern, fn in fwd_hooks:
                for name in self._select(pattern):
                    point = self.hook_dict[name]
                    handles.append(point.register_forward_hook(lambda mod, args, out, fn=fn: fn(out, mod)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def run_with_hooks(self, *args: Any, fwd_hooks: Iterable[tuple[str, HookFn]] = (), **kwargs: Any) -> Any:
        """Run forward with hooks that may read or replace activations (return a tensor to replace)."""
        with self.hooks(fwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(
        self, *args: Any, names: str | Iterable[str] | None = None, detach: bool = True, **kwargs: Any
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """Run forward; return `(output, cache)` with the activations at the hook points named."""
        cache: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            cache[hook.name] = x.detach() if detach else x

        output = self.run_with_hooks(*args, fwd_hooks=[(n, save) for n in self._select(names)], **kwargs)
        return output, cache
