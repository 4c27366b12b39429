import pytest

from medvqa_lib.config import PROFILES, get_profile, resolve_data_dir
from medvqa_lib.errors import ConfigError, UnknownNameError


def test_profiles_scale_up():
    smoke, cpu, gpu = (PROFILES[n] for n in ("smoke", "cpu", "gpu"))
    assert smoke.synthetic_images < cpu.synthetic_images < gpu.synthetic_images
    assert smoke.synthetic_image_size <= cpu.synthetic_image_size <= gpu.synthetic_image_size
    assert len(cpu.seeds) >= 3 and len(gpu.seeds) >= 3


def test_unknown_profile_lists_choices():
    with pytest.raises(UnknownNameError, match="unknown profile 'laptop'; choose one of: cpu, gpu, smoke"):
        get_profile("laptop")


def test_overrides_apply_and_none_keeps_default():
    p = get_profile("smoke", synthetic_image_size=32, synthetic_images=None, seeds=[1, 2])
    assert p.synthetic_image_size == 32 and p.seeds == (1, 2)
    assert p.synthetic_images == PROFILES["smoke"].synthetic_images
    assert PROFILES["smoke"].synthetic_image_size == 64  # the registry is not mutated


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batchsize": 3}, "unknown profile parameter\\(s\\) batchsize"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"synthetic_image_size": 100}, "synthetic_image_size must be a multiple of 16"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"max_train_samples": -1}, "max_train_samples must be None or a positive integer"),
        ({"text_backbone": "gpt"}, "text_backbone must be one of"),
    ],
)
def test_bad_parameters_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_profile("cpu", **overrides)


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDVQA_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    assert resolve_data_dir("synthetic") is None
    assert resolve_data_dir(tmp_path) == tmp_path.resolve()
    monkeypatch.setenv("MEDVQA_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path.resolve()
    assert resolve_data_dir("synthetic") is None  # an explicit choice wins over the variable
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_data_dir(tmp_path / "missing")


def test_plan_helpers_shared_by_every_paper():
    from dataclasses import dataclass

    from medvqa_lib.config import checked, plan_of

    plans = {"smoke": {"model": {"depth": 2}, "epochs": 1}}
    plan = plan_of(plans, get_profile("smoke"), "Toy")
    plan["model"]["depth"] = 9  # a copy: the plan itself is never edited
    assert plans["smoke"]["model"]["depth"] == 2 and plan["epochs"] == 1
    with pytest.raises(ConfigError, match="unknown profile 'cpu': there is no Toy plan for it; choose one of smoke"):
        plan_of(plans, "cpu", "Toy")

    @dataclass
    class Study:
        epochs: int = 1
        lr: float = 0.1

    assert checked("toy key(s)", {"epochs": 3, "lr": None}, Study) == {"epochs": 3}  # None: keep the plan's
    assert checked("toy key(s)", None, ("a",)) == {}
    with pytest.raises(ConfigError, match=r"unknown toy key\(s\) 'epoch', 'rate'; valid ones are: epochs, lr"):
        checked("toy key(s)", {"epoch": 2, "rate": 1, "lr": 3}, Study)
