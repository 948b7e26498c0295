"""config.validate: one-line UserErrors for out-of-range learning rates, epochs, batch sizes and GPTQ
settings, checked only where the method has the key."""

import pytest
from hydra import compose, initialize_config_dir

from baseq.config import register_configs, validate
from baseq.errors import UserError
from conftest import REPO


def composed(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["device=cpu", *overrides])


@pytest.mark.parametrize("override, message", [
    ("method.lr.bias=0", "method.lr.bias=0.0 must be > 0"),
    ("method.lr.scale=-1e-3", "method.lr.scale=-0.001 must be > 0"),
    ("method.stage1_epochs=-1", "method.stage1_epochs=-1 must be >= 0"),
    ("method.stage2_epochs=-2", "method.stage2_epochs=-2 must be >= 0"),
    ("method.train_batch_size=0", "method.train_batch_size=0 must be >= 1"),
    ("calib.batch_size=0", "calib.batch_size=0 must be >= 1"),
    ("eval.ppl.batch_size=0", "eval.ppl.batch_size=0 must be >= 1"),
    ("method.gptq.damp=0", "method.gptq.damp=0.0 must be > 0"),
    ("method.gptq.block_size=0", "method.gptq.block_size=0 must be >= 1"),
    ("method.gptq.nsamples=0", "method.gptq.nsamples=0 must be >= 1"),
    ("method.heldout_samples=4", "method.heldout_samples=4 must be in [0, calib.nsamples=4)"),
    ("method.act_clip_ratio=1.0", "a learned clip is a sigmoid and must start below 1"),
])
def test_out_of_range_values_are_one_line_errors(override, message):
    with pytest.raises(UserError) as err:
        validate(composed(override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_method_specific_keys_are_checked_only_where_they_exist():
    validate(composed("method=quarot"))   # no lr, epochs or train_batch_size: nothing to check, no KeyError
    with pytest.raises(UserError, match="method.gptq.damp=-0.1 must be > 0"):
        validate(composed("method=quarot", "method.gptq.damp=-0.1"))
    validate(composed("method.stage1_epochs=0", "method.stage2_epochs=0"))   # 0 epochs: the stage is skipped


def test_load_quantized_needs_a_saved_model_folder(tmp_path):
    with pytest.raises(UserError, match="holds no manifest.json"):
        validate(composed(f"load_quantized={tmp_path}"))
