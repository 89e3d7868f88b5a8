"""PEFT methods, one per module; ``METHODS`` maps a training profile's ``method`` to its :class:`Method`.

The contract every method meets (each hook, its default, the traits) is
:class:`edge_runtime.methods.base.Method`. Adding a method is one module that ends with
``METHOD = Method(...)``, its tests, and one ``register`` line below: its section of the training
spec, its CLI choice, the planner's and the memory model's view of it all come from that object.
"""

from edge_runtime.methods import droppeft, fdlora, federa, fedpeptao, lora, prompt
from edge_runtime.methods.base import Method

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name and its spec section must be new)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    sections = {m.config[0] for m in METHODS.values() if m.config}
    if method.config and method.config[0] in sections | {"train", "model", "task", "labels", "method", "seed"}:
        raise ValueError(f"method {method.name!r}: spec section {method.config[0]!r} is taken")
    METHODS[method.name] = method
    return method


register(lora.METHOD)
register(federa.METHOD)
register(fdlora.METHOD)
register(prompt.METHOD)
register(fedpeptao.METHOD)
register(droppeft.METHOD)


def default_lr(method: str, lr: float | None = None) -> float:
    """``lr`` if given, else the method's local learning rate."""
    return lr if lr is not None else float(METHODS[method].default_lr)


def config_sections() -> dict[str, type]:
    """The training spec's method sections, in registration order: ``{"lora": LoraMethodConfig, ...}``."""
    return {m.config[0]: m.config[1] for m in METHODS.values() if m.config}
