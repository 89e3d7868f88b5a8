"""profiles/: every shipped file validates; bad files get errors naming the file, key and value."""

import pytest

from edge_runtime.device.profiles import (ProfileError, device_classes, find_device_class, find_training_profile,
                                          load_device_class, load_training_profile, training_profiles)

GOOD_DEVICE = """name: test-board
memory: 4GiB
reserved: 1GiB
accelerator: cuda
integrated_gpu: true
cuda_capability: [8, 7]
fp16: true
bitsandbytes: false
cpu_cores: 4
gflops_fp32: 100
"""


def test_every_shipped_profile_loads():
    classes = device_classes()
    assert {"jetson-nano-4gb", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-32gb",
            "jetson-agx-orin-64gb", "raspberry-pi-5-8gb", "x86-cpu-box"} <= set(classes)
    assert classes["jetson-nano-4gb"].budget == 4 * 1024**3 - int(1.2 * 1024**3)
    profiles = training_profiles()
    methods = {p.training["method"] for p in profiles.values()}
    assert {"lora", "federa", "fdlora", "prompt", "fedpeptao", "droppeft"} <= methods   # one per method at least
    spec = profiles["fedpeptao-minilm"].spec(labels=("x", "y"))
    assert spec.method == "fedpeptao" and spec.fedpeptao.share_ratio == 0.5 and spec.labels == ("x", "y")
    spec = profiles["droppeft-minilm"].spec(labels=("x", "y"))
    assert spec.method == "droppeft" and spec.droppeft.ratios == (0.0, 0.2, 0.4, 0.6) and len(spec.droppeft.arms()) == 7
    assert find_device_class("x86-cpu-box").accelerator == "cpu"
    assert find_training_profile("lora-minilm").training["lora"]["rank"] == 8


def _write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("change, message", [
    (("memory: 4GiB", "memory: 4 gigs"), "memory: not a size: '4 gigs'"),
    (("reserved: 1GiB", "reserved: 5GiB"), "reserved: '5GiB' leaves nothing"),
    (("accelerator: cuda", "accelerator: tpu"), "accelerator: expected 'cuda' or 'cpu', got 'tpu'"),
    (("fp16: true", "fp16: yes please"), "fp16: expected true or false, got 'yes please'"),
    (("cpu_cores: 4", "cpu_cores: four"), "cpu_cores: expected a positive integer, got 'four'"),
    (("cuda_capability: [8, 7]", "cuda_capability: 8.7"), "cuda_capability: expected [major, minor], got 8.7"),
    (("cpu_cores: 4", "cpu_cores: 4\ncolour: green"), "unknown key(s) ['colour']"),
    (("bitsandbytes: false\n", ""), "missing key(s) ['bitsandbytes']"),
])
def test_device_class_errors_name_the_file_key_and_value(tmp_path, change, message):
    path = _write(tmp_path, GOOD_DEVICE.replace(*change))
    with pytest.raises(ProfileError) as err:
        load_device_class(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_good_device_class_and_bad_yaml(tmp_path):
    assert load_device_class(_write(tmp_path, GOOD_DEVICE)).budget == 3 * 1024**3
    with pytest.raises(ProfileError, match=r"p.yaml: not valid YAML: line 2, column"):
        load_device_class(_write(tmp_path, "name: a\n  memory: [4GiB\n"))
    with pytest.raises(ProfileError, match="expected a mapping"):
        load_device_class(_write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("training, message", [
    ("{model: minilm-l6, method: adam}", "training.method must be one of"),
    ("{model: minilm-l6, lora: {rank: -1}}", "lora.rank must be a positive integer, got -1"),
    ("{model: minilm-l6, lora: {rnak: 8}}", "training.lora: unknown keys ['rnak']"),
    ("{model: minilm-l6, train: {lr: 0}}", "train.lr must be > 0, got 0"),
    ("{model: minilm-l6, fedpeptao: {unshared: keep}}", "fedpeptao.unshared must be 'personal' or 'mask', got 'keep'"),
    ("{model: minilm-l6, labels: [a, b]}", "training.labels: comes from the data"),
])
def test_training_profile_errors_name_the_file_key_and_value(tmp_path, training, message):
    path = _write(tmp_path, f"name: t\ntraining: {training}\n")
    with pytest.raises(ProfileError) as err:
        load_training_profile(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_duplicate_names_and_unknown_lookups(tmp_path):
    (tmp_path / "devices").mkdir()
    _write(tmp_path / "devices", GOOD_DEVICE, "a.yaml")
    _write(tmp_path / "devices", GOOD_DEVICE, "b.yaml")
    with pytest.raises(ProfileError, match="also used by"):
        device_classes(tmp_path)
    with pytest.raises(ProfileError, match="no device class 'toaster'"):
        find_device_class("toaster")


def test_device_profiles_may_change_local_settings_only():
    from edge_runtime.device.profiles import apply_device_profile, validate_device_profile
    from edge_runtime.training.spec import TrainingSpec

    spec = TrainingSpec(labels=("a", "b"), method="federa")
    good = {"name": "small", "training": {"train": {"batch_size": 4, "max_seq_len": 32}}}
    overrides = validate_device_profile(good, spec)
    applied = apply_device_profile(spec, overrides)
    assert (applied.train.batch_size, applied.train.max_seq_len, applied.method) == (4, 32, "federa")
    with pytest.raises(ProfileError, match="training.lora: set by the server for the whole fleet"):
        validate_device_profile({"name": "x", "training": {"lora": {"rank": 4}}}, spec)
    with pytest.raises(ProfileError, match="federa cannot train on a nf4 base"):
        validate_device_profile({"name": "x", "training": {"quantization": "nf4"}}, spec)
    assert validate_device_profile({"name": "x", "training": {"quantization": "nf4"}},
                                   TrainingSpec(labels=("a", "b")))["quantization"] == "nf4"


def test_jetson_nano_is_a_planning_target_only_and_plan_says_so(capsys):
    from edge_runtime.cli import main

    classes = device_classes()
    assert "Python 3.6" in classes["jetson-nano-4gb"].unsupported
    assert all(not c.unsupported for n, c in classes.items() if n != "jetson-nano-4gb")
    assert main(["plan", "--device-class", "jetson-nano-4gb", "--profile", "lora-minilm"]) == 0
    assert "NOTE: edge-runtime cannot run on jetson-nano-4gb" in capsys.readouterr().out
    assert main(["plan", "--device-class", "jetson-orin-nano-8gb", "--profile", "lora-minilm"]) == 0
    assert "NOTE" not in capsys.readouterr().out
