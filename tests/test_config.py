"""Configuration: file constants < PRESET < --NAME=value, with type checks and clear errors."""
import random

import numpy as np
import pytest
import torch

import utils


def script_constants(**changes):
    """The UPPER_CASE constants of a made-up script, as configure() receives its globals()."""
    ns = dict(PRESET="quick", DATA_DIR="data", CKPT_DIR="checkpoints", DEVICE="auto", SEED=0,
              DOWNLOAD=False, TASKS=["mnist0", "mnist1"], EPOCHS=7, TRAIN_LIMIT=0, LR=1e-3,
              VAL_FRACTION=0.1, lowercase_ignored=1, NOT_A_SETTING=object())
    ns.update(changes)
    return ns


def test_defaults_are_the_file_constants_then_the_preset():
    cfg = utils.configure(script_constants(), [])
    assert cfg.SEED == 0 and cfg.LR == 1e-3 and cfg.TASKS == ["mnist0", "mnist1"]
    assert cfg.EPOCHS == utils.PRESETS["quick"]["EPOCHS"]
    assert not hasattr(cfg, "lowercase_ignored") and not hasattr(cfg, "NOT_A_SETTING")


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
    got = getattr(utils.configure(script_constants(), [arg]), name)
    assert got == value and type(got) is type(value)


def test_precedence_file_then_preset_then_command_line():
    ns = script_constants(PRESET="paper", TRAIN_LIMIT=123)
    assert utils.configure(ns, []).TRAIN_LIMIT == 0                   # the preset beats the file
    assert utils.configure(ns, ["--PRESET=smoke"]).TRAIN_LIMIT == 400  # a preset chosen on the command line
    cfg = utils.configure(ns, ["--PRESET=smoke", "--TRAIN_LIMIT=7"])
    assert cfg.TRAIN_LIMIT == 7 and cfg.PRESET == "smoke"             # the command line beats both
    assert cfg.EPOCHS == 1 and cfg.SEED == 0  # untouched: preset value, file value
    assert ns["TRAIN_LIMIT"] == 123           # the script's globals are left alone


def test_unknown_name_lists_valid_names():
    with pytest.raises(utils.UserError, match="unknown constant 'EPOHCS'") as err:
        utils.configure(script_constants(), ["--EPOHCS=2"])
    for name in ("EPOCHS", "LR", "TASKS", "PRESET"):
        assert name in str(err.value)


@pytest.mark.parametrize("arg", ["--EPOCHS=1.5", "--EPOCHS=True", "--DOWNLOAD=1", "--DOWNLOAD=yes",
                                 "--LR=fast", "--TASKS=3", "--TASKS=[1, 2]", "--SEED={[1]: 2}"])
def test_wrong_type(arg):
    name = arg[2:].split("=")[0]
    with pytest.raises(utils.UserError, match=f"{name} must be of type"):
        utils.configure(script_constants(), [arg])


def test_unknown_preset_lists_presets():
    for argv, ns in ((["--PRESET=huge"], script_constants()), ([], script_constants(PRESET="huge"))):
        with pytest.raises(utils.UserError, match="unknown PRESET 'huge'") as err:
            utils.configure(ns, argv)
        assert all(p in str(err.value) for p in utils.PRESETS)


@pytest.mark.parametrize("arg", ["--EPOCHS", "EPOCHS=2", "-EPOCHS=2"])
def test_malformed_argument(arg):
    with pytest.raises(utils.UserError, match="write --NAME=value") as err:
        utils.configure(script_constants(), [arg])
    assert "EPOCHS" in str(err.value) and "Valid names" in str(err.value)


def test_result_config_excludes_run_only_keys():
    cfg = utils.configure(script_constants(), ["--DEVICE=cpu"])
    config = utils.result_config(cfg)
    assert not set(config) & utils.NON_RESULT_KEYS
    assert {"SEED", "LR", "EPOCHS", "TRAIN_LIMIT", "VAL_FRACTION"} <= set(config)
    assert "SEED" not in utils.result_config(cfg, extra_ignored=["SEED"])
    # moving the data or the checkpoints does not change what a run computes
    other = utils.configure(script_constants(), ["--DATA_DIR=elsewhere", "--CKPT_DIR=x", "--TASKS=['a']"])
    assert utils.result_config(other) == config


def test_get_device():
    expected = ("cuda" if torch.cuda.is_available() else
                "mps" if torch.backends.mps.is_available() else "cpu")
    assert utils.get_device("auto").type == expected
    assert utils.get_device("cpu") == torch.device("cpu")
    with pytest.raises(utils.UserError, match="not a device name"):
        utils.get_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_is_a_user_error():
    with pytest.raises(utils.UserError, match="no CUDA device"):
        utils.get_device("cuda")


def test_set_seed_repeats_every_source():
    def draw():
        return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()
    utils.set_seed(5)
    first = draw()
    utils.set_seed(5)
    assert draw() == first
    utils.set_seed(6)
    assert draw() != first
