"""Configuration: file constants < PRESET < --NAME=value, with type checks and clear errors."""
import random

import numpy as np
import pytest
import torch

import configuration
from configuration import UserError


def script_constants(**changes):
    """The globals of a made-up script, as configure() receives them: UPPER_CASE constants and PRESETS."""
    ns = dict(PRESET="", DATA_DIR="data", CKPT_DIR="checkpoints", DEVICE="auto", SEED=0,
              DOWNLOAD=False, TASKS=["mnist0", "mnist1"], EPOCHS=7, TRAIN_LIMIT=0, LR=1e-3,
              VAL_FRACTION=0.1, lowercase_ignored=1, NOT_A_SETTING=object(),
              PRESETS={"paper": dict(EPOCHS=1, LR=1e-3), "smoke": dict(TRAIN_LIMIT=400, EPOCHS=1)})
    ns.update(changes)
    return ns


def test_a_plain_run_uses_the_constants_as_written():
    cfg = configuration.configure(script_constants(), [])
    assert cfg.SEED == 0 and cfg.LR == 1e-3 and cfg.TASKS == ["mnist0", "mnist1"]
    assert cfg.EPOCHS == 7 and cfg.changes == {}
    assert not hasattr(cfg, "lowercase_ignored") and not hasattr(cfg, "NOT_A_SETTING")
    assert "PRESETS" not in configuration.settings(cfg)


def test_an_edited_constant_reaches_each_script():
    """Editing the constant at the top of a script changes what a plain run uses."""
    import model_FUSE
    import prune_transform
    import train_task
    for module, name, value in ((train_task, "EPOCHS", 3), (prune_transform, "TRANSFER_EPOCHS", 4),
                                (model_FUSE, "C", 12)):
        namespace = dict(vars(module), **{name: value})
        assert getattr(configuration.configure(namespace, []), name) == value


def test_the_constants_are_the_block_from_preset_to_presets(monkeypatch):
    """Names above PRESET or below PRESETS are not settings: not overridable, not part of any resume key."""
    import model_FUSE
    import train_task
    for module, outside in ((train_task, "CPU_MINUTES_PER_TASK"), (model_FUSE, "ALL_THREADS"),
                            (model_FUSE, "SEARCH_KEYS")):
        with pytest.raises(UserError, match=f"unknown constant '{outside}'"):
            configuration.configure(vars(module), [f"--{outside}=1"])
    before = configuration.result_config(configuration.configure(vars(train_task), []))
    monkeypatch.setattr(train_task, "CPU_MINUTES_PER_TASK", 99.0)  # a cost estimate edited
    assert configuration.result_config(configuration.configure(vars(train_task), [])) == before
    names = list(configuration.constants(vars(train_task)))
    assert names[0] == "PRESET" and names[-1] == "GPUS_PER_UNIT" and "EPOCHS" in names


def test_every_preset_names_constants_of_its_script():
    import model_FUSE
    import prune_transform
    import train_task
    for module in (train_task, prune_transform, model_FUSE):
        assert {"paper", "smoke"} <= set(module.PRESETS)
        for preset in module.PRESETS:
            configuration.configure(vars(module), [f"--PRESET={preset}"])  # raises on a name the script lacks


def test_a_preset_naming_an_unknown_constant_is_an_error():
    ns = script_constants(PRESETS={"paper": dict(EPOHCS=1)})
    with pytest.raises(UserError, match="preset 'paper' sets EPOHCS, which is not a constant") as err:
        configuration.configure(ns, ["--PRESET=paper"])
    assert "EPOCHS" in str(err.value)


def test_changes_record_what_the_preset_and_the_command_line_changed():
    cfg = configuration.configure(script_constants(), ["--PRESET=smoke", "--SEED=4"])
    assert cfg.changes == {"TRAIN_LIMIT": (0, 400, "preset smoke"), "EPOCHS": (7, 1, "preset smoke"),
                           "SEED": (0, 4, "command line"), "PRESET": ("", "smoke", "command line")}


@pytest.mark.parametrize("arg, name, value", [
    ("--SEED=3", "SEED", 3),
    ("--LR=0.01", "LR", 0.01),
    ("--LR=1", "LR", 1.0),                      # a float constant accepts an int
    ("--DOWNLOAD=True", "DOWNLOAD", True),
    ("--DATA_DIR=/tmp/some/where", "DATA_DIR", "/tmp/some/where"),  # a bare word is a string
    ("--DEVICE=cpu", "DEVICE", "cpu"),
    ("--CKPT_DIR=2024", "CKPT_DIR", "2024"),    # a path that looks like a number stays a string
    ("--TASKS=['sandal']", "TASKS", ["sandal"]),
    ("--TASKS=('a', 'b')", "TASKS", ["a", "b"]),  # any sequence, converted to the default's type
])
def test_override_parsing(arg, name, value):
    got = getattr(configuration.configure(script_constants(), [arg]), name)
    assert got == value and type(got) is type(value)


def test_precedence_file_then_preset_then_command_line():
    ns = script_constants(PRESET="smoke", TRAIN_LIMIT=123)
    assert configuration.configure(ns, []).TRAIN_LIMIT == 400                   # the preset beats the file
    assert configuration.configure(ns, ["--PRESET=paper"]).TRAIN_LIMIT == 123   # paper leaves it: the file's value
    assert configuration.configure(ns, ["--PRESET="]).TRAIN_LIMIT == 123        # no preset: the file's value
    cfg = configuration.configure(ns, ["--PRESET=smoke", "--TRAIN_LIMIT=7"])
    assert cfg.TRAIN_LIMIT == 7 and cfg.PRESET == "smoke"               # the command line beats both
    assert cfg.EPOCHS == 1 and cfg.SEED == 0  # untouched: preset value, file value
    assert ns["TRAIN_LIMIT"] == 123           # the script's globals are left alone


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match="unknown constant 'EPOHCS'") as err:
        configuration.configure(script_constants(), ["--EPOHCS=2"])
    for name in ("EPOCHS", "LR", "TASKS", "PRESET"):
        assert name in str(err.value)


@pytest.mark.parametrize("arg", ["--EPOCHS=1.5", "--EPOCHS=True", "--DOWNLOAD=1", "--DOWNLOAD=yes",
                                 "--LR=fast", "--TASKS=3", "--TASKS=[1, 2]", "--SEED={[1]: 2}"])
def test_wrong_type(arg):
    name = arg[2:].split("=")[0]
    with pytest.raises(UserError, match=f"{name} must be of type"):
        configuration.configure(script_constants(), [arg])


def test_unknown_preset_lists_presets():
    for argv, ns in ((["--PRESET=huge"], script_constants()), ([], script_constants(PRESET="huge"))):
        with pytest.raises(UserError, match="unknown PRESET 'huge'") as err:
            configuration.configure(ns, argv)
        assert "paper" in str(err.value) and "smoke" in str(err.value)


@pytest.mark.parametrize("arg", ["--EPOCHS", "EPOCHS=2", "-EPOCHS=2"])
def test_malformed_argument(arg):
    with pytest.raises(UserError, match="write --NAME=value") as err:
        configuration.configure(script_constants(), [arg])
    assert "EPOCHS" in str(err.value) and "Valid names" in str(err.value)


def test_result_config_excludes_run_only_keys():
    cfg = configuration.configure(script_constants(), ["--DEVICE=cpu"])
    config = configuration.result_config(cfg)
    assert not set(config) & configuration.NON_RESULT_KEYS
    assert {"SEED", "LR", "EPOCHS", "TRAIN_LIMIT", "VAL_FRACTION"} <= set(config)
    assert "SEED" not in configuration.result_config(cfg, extra_ignored=["SEED"])
    # moving the data or the checkpoints does not change what a run computes
    other = configuration.configure(script_constants(), ["--DATA_DIR=elsewhere", "--CKPT_DIR=x", "--TASKS=['a']"])
    assert configuration.result_config(other) == config


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_the_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert configuration.get_device("auto") == torch.device(expected)


def test_get_device():
    assert configuration.get_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="not a device name"):
        configuration.get_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_is_a_user_error():
    with pytest.raises(UserError, match="no CUDA device"):
        configuration.get_device("cuda")


def test_set_seed_repeats_every_source():
    def draw():
        return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()
    configuration.set_seed(5)
    first = draw()
    configuration.set_seed(5)
    assert draw() == first
    configuration.set_seed(6)
    assert draw() != first
