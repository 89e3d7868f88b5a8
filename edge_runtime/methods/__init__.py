"""PEFT methods, one per module; ``METHODS`` maps a training profile's ``method`` to its module.

Every method module provides the same functions, so the simulator, the agent and the server
never branch on the method:

- ``build(base_model, spec)``: wrap the base model (the same on the server and every device);
- ``initial_global(model, spec)``: server, once per run: the round-0 global adapter;
- ``NEEDS_INIT`` / ``prepare(model, spec, init)``: whether devices need that round-0 adapter
  shipped to set the model up (FeDeRA's residual base), and the set-up;
- ``trainable_state`` / ``load_trainable_state``: the upload, and loading a global;
- ``personalise(...)``: a device's own model from the global one, evaluated (FDLoRA's fusion);
- ``local_train(...)``: one round of local training;
- ``aggregate(global, updates, server_state, spec, fleet_size)``: server, one round's new global
  and server-side state (FedAvg for most; FedPepTAO's adaptive update keeps momentum there);
- ``SCORING`` (optional, default False) / ``score(...)`` / ``select(...)``: a score round before
  training whose per-device reports the server turns into the global's layout (FedPepTAO);
- ``assign(server_state, devices, spec, round)`` (optional): server, at the start of a training
  round: per-device spec overrides (DropPEFT's dropout configuration, chosen by a bandit) that
  travel in the round manifest; ``check_update(metrics, steps, global, spec)`` (optional)
  refuses an update whose reported numbers the method's ``aggregate`` cannot use;
- ``save_adapter(model, folder)``: an adapter folder that loads onto the untouched base
  (peft LoRA, or a prompt folder for the prompt methods);
  ``save_personal_adapter(model, personal, folder)``: the same for the device's own model.
"""

from edge_runtime.errors import ConfigError
from edge_runtime.methods import droppeft, fdlora, federa, fedpeptao, lora, prompt

METHODS = {"lora": lora, "federa": federa, "fdlora": fdlora, "prompt": prompt, "fedpeptao": fedpeptao,
           "droppeft": droppeft}


def scoring(method) -> bool:
    """Whether ``method`` starts its runs with a score round (``SCORING``; False when absent)."""
    return bool(getattr(method, "SCORING", False))


def default_lr(method: str, lr: float | None = None) -> float:
    """``lr`` if given, else the method's local learning rate (``DEFAULT_LR``; 1e-3 when absent)."""
    return lr if lr is not None else float(getattr(METHODS[method], "DEFAULT_LR", 1e-3))


def with_assignment(spec, assignment: dict | None):
    """``spec`` with the server's per-device assignment applied (a method's ``assign`` output for
    one device). Only the keys the method lists in ``ASSIGNABLE`` may change; anything else, or a
    bad value, is a ConfigError naming the key."""
    if not assignment:
        return spec
    from edge_runtime.training.spec import TrainingSpec

    allowed = getattr(METHODS[spec.method], "ASSIGNABLE", {})
    d = spec.to_json()
    if not isinstance(assignment, dict):
        raise ConfigError(f"assignment: expected a mapping, got {type(assignment).__name__}")
    for section, values in assignment.items():
        if section not in allowed or not isinstance(values, dict) or set(values) - set(allowed[section]):
            raise ConfigError(f"assignment {section}: {values!r} is not something the server may set per device "
                              f"for {spec.method} (allowed: {allowed})")
        d[section] = {**d[section], **values}
    return TrainingSpec.from_json(d)
