import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.training.spec import TrainingSpec, apply_overrides


def test_spec_json_round_trip_with_every_method_section():
    spec = TrainingSpec(labels=("a", "b"), method="fdlora")
    back = TrainingSpec.from_json(spec.to_json())
    assert back == spec


def test_overrides_reach_nested_sections_and_are_validated():
    d = TrainingSpec(labels=("a", "b")).to_json()
    spec = TrainingSpec.from_json(apply_overrides(d, ["method=federa", "federa.residual=false",
                                                      "fdlora.personal_epochs=0.5", "train.lr=0.01"]))
    assert (spec.method, spec.federa.residual, spec.fdlora.personal_epochs, spec.train.lr) == \
        ("federa", False, 0.5, 0.01)
    assert d["federa"]["residual"] is True  # the input is not modified
    # YAML 1.1 reads 5e-3 (no dot) as a string: an override means the number
    spec = TrainingSpec.from_json(apply_overrides(d, ["train.lr=5e-3", "train.weight_decay=1E-2",
                                                      "train.micro_batch_size=16"]))
    assert (spec.train.lr, spec.train.weight_decay, spec.train.micro_batch_size) == (0.005, 0.01, 16)
    assert apply_overrides(d, ["method=e5"])["method"] == "e5"   # only numbers in exponent form change
    assert apply_overrides(d, ['method="1e5"'])["method"] == "1e5"   # a quoted value stays text


@pytest.mark.parametrize("item, message", [
    ("fdlora.bogus=1", r"training.fdlora: unknown keys \['bogus'\]"),
    ("fdlora.fusion_evals=2", "fdlora.fusion_evals must be an integer >= 3"),
    ("federa.residual=maybe", "federa.residual must be true or false"),
    ("method=nope", "training.method must be one of"),
    ("lora.rank=0", "lora.rank must be a positive integer"),
    ("nosection.x=1", "'nosection' is not a section"),
    ("noequals", "expected KEY=VALUE"),
    ("train.lr=[1, 2", "not valid YAML"),
    ("train.lr=fast", "train.lr must be a finite number, got 'fast'"),
    ("train.lr=1e999", "train.lr must be a finite number, got inf"),
    ("train.grad_clip=-1", "train.weight_decay and train.grad_clip must be >= 0"),
    ("train.micro_batch_size=-2", "train.micro_batch_size must be an integer >= 0"),
])
def test_bad_overrides_name_the_field(item, message):
    d = TrainingSpec(labels=("a", "b")).to_json()
    with pytest.raises(ConfigError, match=message):
        TrainingSpec.from_json(apply_overrides(d, [item]))


def test_a_section_that_is_not_an_object_is_an_error():
    d = TrainingSpec(labels=("a", "b")).to_json()
    d["fdlora"] = [1, 2]
    with pytest.raises(ConfigError, match="training.fdlora must be an object"):
        TrainingSpec.from_json(d)
