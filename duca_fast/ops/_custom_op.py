"""Registration helper shared by the op families' ``custom_ops`` modules."""

from __future__ import annotations

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
