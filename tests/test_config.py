"""Config loading: defaults, YAML, --set overrides, errors naming key and source, round trip."""
from __future__ import annotations

import pytest

from goat_dist.config import Config, ConfigError, load_config, parse_override, save_config, to_dict


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_typed_sections():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.train.batch_size == 1024 and cfg.sampling.fanouts == -1
    assert cfg.eval.ks == [10, 20, 50]


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  batch_size: 256\n  dense_lr: 1\nsampling:\n  fanouts: [10, 5]\n")
    cfg = load_config(p, ["train.seed=7", "sampling.fanouts={user_item: [3, 2]}", "model.fusion=sum"])
    assert cfg.train.batch_size == 256
    assert cfg.train.dense_lr == 1.0 and isinstance(cfg.train.dense_lr, float)  # int accepted for float
    assert cfg.train.seed == 7
    assert cfg.sampling.fanouts == {"user_item": [3, 2]}
    assert cfg.model.fusion == "sum"


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert "c.yaml" in str(exc.value) and "train.batch_sise" in str(exc.value) and "unknown key" in str(exc.value)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_config(write(tmp_path, "trian: {}\n"))


@pytest.mark.parametrize("text,key", [("train:\n  batch_size: 2.5\n", "train.batch_size"),
                                      ("train:\n  batch_size: '3'\n", "train.batch_size"),
                                      ("log:\n  tensorboard: 1\n", "log.tensorboard"),
                                      ("eval:\n  ks: [10, x]\n", "eval.ks[1]"),
                                      ("data:\n  synth: 3\n", "data.synth")])
def test_wrong_type_names_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert key in str(exc.value) and "c.yaml" in str(exc.value)


def test_restricted_string_is_checked_at_load_even_when_unused(tmp_path):
    # modality_bpr_weight is 0 (the default), so nothing downstream would look at the views key.
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "loss:\n  modality_bpr_views: alligned\n"))
    msg = str(exc.value)
    assert "c.yaml" in msg and "loss.modality_bpr_views" in msg and "raw, aligned" in msg and "'alligned'" in msg
    with pytest.raises(ConfigError, match=r"--set loss.modality_bpr_views=x.*one of raw, aligned"):
        load_config(None, ["loss.modality_bpr_views=x"])
    assert load_config(None, ["loss.modality_bpr_views=aligned"]).loss.modality_bpr_views == "aligned"
    with pytest.raises(ConfigError, match=r"--set model.item_knn_id_combine=sum.*one of last, mean"):
        load_config(None, ["model.item_knn_id_combine=sum"])
    assert load_config(None, ["model.item_knn_id_combine=mean"]).model.item_knn_id_combine == "mean"


def test_restricted_list_checks_every_element(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "loss:\n  cmcl_terms: [user_item, item_view]\n"))
    msg = str(exc.value)
    assert "c.yaml" in msg and "loss.cmcl_terms" in msg and "'item_view'" in msg and "user_item, item_views" in msg
    assert load_config(None, ["loss.cmcl_terms=[item_views]"]).loss.cmcl_terms == ["item_views"]
    assert load_config(None).loss.cmcl_terms == ["user_item", "item_views", "user_views"]


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 (PyYAML) reads ``3e-3`` as a string; a float key takes it as the number, in a file and
    in ``--set``; an int key and a non-number string are still errors."""
    cfg = load_config(write(tmp_path, "loss:\n  l2: 1e-2\n"), ["train.dense_lr=3e-3", "train.sparse_lr=-5E+1"])
    assert (cfg.loss.l2, cfg.train.dense_lr, cfg.train.sparse_lr) == (0.01, 0.003, -50.0)
    assert load_config(None, ["train.dense_lr=.5e1"]).train.dense_lr == 5.0
    with pytest.raises(ConfigError, match=r"--set train.dense_lr=3e.*expected a number, got '3e'"):
        load_config(None, ["train.dense_lr=3e"])
    with pytest.raises(ConfigError, match=r"train.batch_size: expected an integer, got '1e3'"):
        load_config(None, ["train.batch_size=1e3"])


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"--set train.nope=1.*train.nope"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="section.key"):
        parse_override("batch_size=3")
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["train.batch_size=big"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["train.batch_size=64", "data.item_features={image: /x/y.npy}"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs, "configs/ ships at least the synthetic default"
    for path in configs:
        load_config(path)
