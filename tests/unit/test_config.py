"""Config loading: paper defaults, overlays, extends, overrides, and errors that name file and key."""

from pathlib import Path

import pytest

from msbt.config import Config, ConfigError, dump_config, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "workflows" / "configs"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_paper_yaml_equals_the_defaults():
    assert load_config([CONFIGS / "paper.yaml"]) == Config()


def test_paper_settings_are_the_defaults():
    c = Config()
    assert (c.stage1.optimizer, c.stage1.learning_rate, c.stage1.batch_size, c.stage1.epochs) == ("adagrad", 1e-3, 16, 30)
    assert c.data.split == (0.7, 0.2, 0.1)
    assert c.stage1.augment.expansion == 3
    assert c.stage1.head.dense_units == ()
    assert len(c.stage2.head.dense_units) == 3 and c.stage2.head.dropout > 0
    assert c.stage2.weights == "parent"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config([path])
    assert isinstance(config, Config)


def test_overlay_changes_only_its_keys(tmp_path):
    overlay = write(tmp_path, "o.yaml", "stage2:\n  head:\n    dropout: 0.2\n")
    config = load_config([overlay])
    assert config.stage2.head.dropout == 0.2
    # the rest of stage 2's head keeps stage 2's defaults, not stage 1's
    assert config.stage2.head.dense_units == Config().stage2.head.dense_units
    assert config.stage1 == Config().stage1


def test_later_overlays_and_overrides_win(tmp_path):
    a = write(tmp_path, "a.yaml", "stage1: {epochs: 5, batch_size: 8}\n")
    b = write(tmp_path, "b.yaml", "stage1: {epochs: 7}\n")
    config = load_config([a, b], ["stage1.epochs=9"])
    assert config.stage1.epochs == 9 and config.stage1.batch_size == 8


def test_extends_is_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "base.yaml", "run: {name: base, num_workers: 2}\n")
    child = write(tmp_path / "sub", "child.yaml", "extends: ../base.yaml\nrun: {name: child}\n")
    config = load_config([child])
    assert (config.run.name, config.run.num_workers) == ("child", 2)


def test_smoke_extends_cpu():
    smoke, cpu = load_config([CONFIGS / "smoke.yaml"]), load_config([CONFIGS / "cpu.yaml"])
    assert smoke.stage1.backbone == cpu.stage1.backbone != Config().stage1.backbone
    assert smoke.stage1.epochs == 1


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config([tmp_path / "a.yaml"])


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ("stage1: {epoch: 3}\n", "stage1.epoch", "unknown key"),
        ("stage2: {head: {dropuot: 0.1}}\n", "stage2.head.dropuot", "unknown key"),
        ("stage1: {epochs: 2.5}\n", "stage1.epochs", "integer"),
        ("stage1: {epochs: true}\n", "stage1.epochs", "integer"),
        ("stage1: {learning_rate: fast}\n", "stage1.learning_rate", "number"),
        ("stage1: {optimizer: rmsprop}\n", "stage1.optimizer", "one of"),
        ("data: {split: [0.7, 0.3]}\n", "data.split", "3 items"),
        ("data: {strict: 'yes'}\n", "data.strict", "true or false"),
        ("stage1: 3\n", "stage1", "mapping"),
        ("bogus: 1\n", "bogus", "unknown key"),
        ("stage2: {augment: {erase: 0.01}}\n", "stage2.augment.erase", "0 (off) or in [0.02, 1)"),
        ("stage2: {augment: {erase: 1.0}}\n", "stage2.augment.erase", "0 (off) or in [0.02, 1)"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, key, problem):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config([path])
    message = str(info.value)
    assert str(path) in message and f"`{key}`" in message and problem in message


def test_bad_key_in_an_extended_file_names_that_file(tmp_path):
    write(tmp_path, "base.yaml", "run: {nmae: x}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key `run\.nmae`"):
        load_config([child])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])
    bad = write(tmp_path, "bad.yaml", "stage1: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config([], ["stage1.epochs"])


def test_config_is_frozen():
    with pytest.raises(Exception):
        Config().stage1.epochs = 3  # type: ignore[misc]


def test_dumped_config_reloads_identically(tmp_path):
    config = load_config([CONFIGS / "cpu.yaml"], ["stage2.head.l2=0.01"])
    path = dump_config(config, tmp_path / "resolved.yaml")
    assert load_config([path]) == config
    assert to_dict(config)["stage2"]["head"]["l2"] == 0.01


def test_settings_added_later_leave_older_records_unchanged():
    """brightness/speckle/blur were added after runs recorded their stage settings: while off they are not
    in the record, so an older manifest's config (these keys only) still matches, keys and resumes included;
    when set they are recorded, and a record without them reads back with them off."""
    from msbt.config import AugmentConfig, StageConfig, from_dict

    older_keys = ["enabled", "expansion", "shift", "rotation", "flip", "zoom", "contrast"]
    assert list(to_dict(AugmentConfig())) == older_keys
    assert to_dict(AugmentConfig(blur=1.0))["blur"] == 1.0 and "speckle" not in to_dict(AugmentConfig(blur=1.0))
    assert to_dict(AugmentConfig(erase=0.3))["erase"] == 0.3 and "erase" not in to_dict(AugmentConfig(blur=1.0))
    record = to_dict(StageConfig())
    assert from_dict(StageConfig, record) == StageConfig()
    assert to_dict(from_dict(StageConfig, to_dict(StageConfig(augment=AugmentConfig(speckle=0.1))))) == \
        to_dict(StageConfig(augment=AugmentConfig(speckle=0.1)))


def test_a_backbone_trained_fast_behind_fixed_batchnorm_is_warned_about():
    """batchnorm_inference with the whole backbone training at Adam 1e-3 collapsed it (docs/models.md): warned;
    the paper's setting, a frozen backbone, a slow enough rate and a head-first schedule are not."""
    from msbt.config import StageConfig, batchnorm_warning

    warned = batchnorm_warning(StageConfig(batchnorm_inference=True, learning_rate=1e-3))
    assert warned and "learning rate 0.001 behind fixed BatchNorm" in warned and "head_epochs" in warned
    assert batchnorm_warning(StageConfig(learning_rate=1e-3)) is None  # BN trains (the paper)
    assert batchnorm_warning(StageConfig(batchnorm_inference=True, trainable_backbone=False)) is None
    assert batchnorm_warning(StageConfig(batchnorm_inference=True, learning_rate=1e-4)) is None
    assert batchnorm_warning(StageConfig(head_epochs=2, epochs=8, learning_rate=1e-3)) is None  # then at 1e-4
    assert batchnorm_warning(StageConfig(head_epochs=2, epochs=8, learning_rate=1e-2))  # then at 1e-3
