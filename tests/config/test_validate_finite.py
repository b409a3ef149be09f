"""validate(): no float key may be inf or nan (`lr=inf` passed `lr > 0`), from the CLI or from YAML."""

import pytest

from dpo_ds.config import Config, ConfigError, load_config
from dpo_ds.config.validate import float_keys

# every float key a user can set, with a value that is otherwise valid for it
FLOAT_KEYS = [
    "lr",
    "max_grad_norm",
    "dist_timeout_s",
    "step_timeout_s",
    "loss.beta",
    "loss.label_smoothing",
    "loss.chosen_nll_weight",
    "loss.gamma",
    "loss.orpo_lambda",
    "loss.discopop_tau",
    "loss.f_alpha",
    "loss.ld_alpha",
    "loss.router_aux_coef",
    "model.reference_mixup_alpha",
    "model.lora.alpha",
    "model.lora.dropout",
    "guard.max_chosen_drop_per_token",
]


def test_float_keys_found_from_the_schema():
    """A float key added to the schema is checked without being listed anywhere: this list is complete."""
    assert sorted(k for k, _ in float_keys(Config())) == sorted(FLOAT_KEYS)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_float_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    assert str(e.value).startswith(f"config key '{key}': must be a finite number, got ")


def test_non_finite_in_a_list_and_in_yaml(tmp_path):
    with pytest.raises(
        ConfigError, match=r"config key 'loss\.weights\[1\]': must be a finite number, got inf"
    ):
        load_config(None, ["loss=[dpo,sft]", "loss.weights=[1,inf]"])
    path = tmp_path / "c.yaml"
    path.write_text("lr: .inf\n")  # YAML's own spelling of infinity
    with pytest.raises(ConfigError, match=r"config key 'lr': must be a finite number, got inf"):
        load_config(str(path))
    path.write_text("loss:\n  beta: .nan\n")
    with pytest.raises(ConfigError, match=r"config key 'loss\.beta': must be a finite number, got nan"):
        load_config(str(path))


def test_finite_values_still_pass():
    cfg = load_config(None, ["lr=1e-6", "max_grad_norm=0", "loss.beta=0.5", "step_timeout_s=null"])
    assert cfg.lr == 1e-6 and cfg.max_grad_norm == 0.0 and cfg.step_timeout_s is None
