"""Registration helpers shared by the op families' ``custom_ops`` modules."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing

import torch


def custom_op(name: str):
    """``torch.library.custom_op`` with the inferred schema, but ``int`` where it would say ``SymInt``.

    The integer options (num_groups, max_tokens, chunk_size, ...) are checked with ``isinstance(int)``;
    as ``int`` in the schema a symbolic size is specialized by the tracer instead of reaching the kernels.
    """

    def register(fn):
        schema = torch.library.infer_schema(fn, mutates_args=()).replace("SymInt", "int")
        return torch.library.custom_op(name, fn, mutates_args=(), schema=schema)

    return register


class OptionsSignature:
    """A kernel's signature with one ``options`` parameter (a frozen dataclass) spread into the dataclass's
    fields, each with its own type and default: what the op's schema says, generated, never written out.

    ``call(fn)`` wraps a kernel written against the compact signature (``fn(..., options, ...)``) so the
    dispatcher can call it with the spread one; the options object is built once per distinct set of
    values (``functools.lru_cache``: its checks run once, not per call). ``named(inputs)`` reads the
    positional ``inputs`` autograd hands ``setup_context`` by parameter name.
    """

    def __init__(self, fn: typing.Callable, options_type: type, skip: tuple[str, ...] = ()) -> None:
        hints = typing.get_type_hints(fn)
        field_hints = typing.get_type_hints(options_type)
        self.options_type = options_type
        self.fields = tuple(f.name for f in dataclasses.fields(options_type) if f.name not in skip)
        parameters = []
        for parameter in inspect.signature(fn).parameters.values():
            if parameter.name != "options":
                parameters.append(parameter.replace(annotation=hints[parameter.name]))
                continue
            for field in dataclasses.fields(options_type):
                if field.name in skip:
                    continue
                parameters.append(
                    inspect.Parameter(
                        field.name,
                        inspect.Parameter.POSITIONAL_OR_KEYWORD,
                        default=field.default,
                        annotation=field_hints[field.name],
                    )
                )
        self.signature = inspect.Signature(parameters, return_annotation=hints["return"])
        self.names = tuple(self.signature.parameters)
        self.make_options = functools.lru_cache(maxsize=256)(self._make_options)

    def _make_options(self, typed_values: tuple) -> typing.Any:
        return self.options_type(**{name: value for name, (_, value) in zip(self.fields, typed_values)})

    def call(self, fn: typing.Callable) -> typing.Callable:
        """``fn`` (compact signature) callable with the spread signature."""

        @functools.wraps(fn)
        def spread(*args, **kwargs):
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = bound.arguments
            # Typed key: True == 1 must not reuse options checked for 1 (the checks refuse bools).
            options = self.make_options(tuple((type(v), v) for v in (values.pop(n) for n in self.fields)))
            return fn(**values, options=options)

        spread.__signature__ = self.signature
        spread.__annotations__ = {
            name: parameter.annotation for name, parameter in self.signature.parameters.items()
        } | {"return": self.signature.return_annotation}
        return spread

    def named(self, inputs: tuple) -> dict[str, typing.Any]:
        return dict(zip(self.names, inputs))


def custom_op_with_options(name: str, options_type: type, skip: tuple[str, ...] = ()):
    """``custom_op`` for a kernel ``fn(..., options: OptionsType, ...)``: the schema carries every field
    of ``options_type`` (but ``skip``) in the place of ``options`` (see ``OptionsSignature``). The op
    gets ``.options_signature``; register its fake kernel with ``register_fake_with_options``."""

    def register(fn):
        signature = OptionsSignature(fn, options_type, skip)
        spread = signature.call(fn)
        schema = torch.library.infer_schema(spread, mutates_args=()).replace("SymInt", "int")
        op = torch.library.custom_op(name, spread, mutates_args=(), schema=schema)
        op.options_signature = signature
        return op

    return register


def register_fake_with_options(op):
    """Register a fake kernel written against the compact signature (``options`` as one object)."""

    def register(fn):
        op.register_fake(op.options_signature.call(fn))
        return fn

    return register
