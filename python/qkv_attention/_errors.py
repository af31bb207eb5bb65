"""Exception classes of the drop-in functions, defined once."""

__all__ = ["InputDtypeError"]


class InputDtypeError(TypeError, RuntimeError):
    """A wrong dtype given to a drop-in function: a ``TypeError``, as our operators raise for a
    wrong dtype, and a ``RuntimeError``, as torch's function raises for the same input (e.g.
    ``torch.nn.functional.scaled_dot_product_attention`` for query, key and value of mixed
    dtypes), so that ``except`` written for either catches it."""
