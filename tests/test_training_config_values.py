"""Training config values as users type them (YAML files, ``key=value`` overrides): numbers, one path
or a list, brace ranges. Config-level only: nothing is built or compiled."""

from __future__ import annotations

import subprocess

import pytest

from cascade_jax.data.config import DataConfig
from cascade_jax.data.webdataset import expand_shards
from cascade_jax.models.config_yaml import load_override_value, load_yaml
from cascade_jax.training import cli, config_from_dict, load_config
from cascade_jax.training.config import LIST_KEYS, TrainConfig


def test_yaml_reads_exponents_without_a_dot_as_numbers():
    assert load_yaml("lr: 1e-4\nx: 5E-4\ny: -2.5e+3\nz: 1_000\nw: .5e1") == {
        "lr": 1e-4, "x": 5e-4, "y": -2500.0, "z": 1000, "w": 5.0}
    # Not numbers: versions, words, and anything quoted stay text.
    assert load_yaml("a: 3.6B\nb: 1e\nc: e5\nd: '1e-4'\ne: 1.2.3") == {
        "a": "3.6B", "b": "1e", "c": "e5", "d": "1e-4", "e": "1.2.3"}
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_yaml("x: !!python/object/apply:os.system [ls]")  # still the safe loader


@pytest.mark.parametrize("override, key, value", [
    ("lr=5e-4", "lr", 5e-4), ("lr=1E-4", "lr", 1e-4), ("lr=1e-4", "lr", 1e-4), ("lr='5e-4'", "lr", 5e-4),
    ("lr=1_000", "lr", 1000), ("lr=1", "lr", 1), ("updates=1_000", "updates", 1000), ("updates=1e3", "updates", 1000),
    ("updates='100'", "updates", 100), ("warmup_updates=10.0", "warmup_updates", 10),
    ("ema_beta=9e-1", "ema_beta", 0.9), ("adaptive_loss_weight=yes", "adaptive_loss_weight", True),
    ("adaptive_loss_weight='false'", "adaptive_loss_weight", False),
    ("experiment_id=2024", "experiment_id", "2024"), ("peak_flops=1.97e14", "peak_flops", 1.97e14),
])
def test_numeric_and_flag_fields_take_what_users_type(override, key, value):
    extra = ["ema_start_iters=1", "ema_iters=1"] if key == "ema_beta" else []
    cfg = load_config("tiny_c", [override, *extra])
    assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(value)


def test_yaml_1_1_strings_in_a_file_are_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nweight_decay: '1e-2'\nupdates: '1_000'\nmesh: {fsdp: '2'}\n"
                    "data: {source: folder, paths: imgs, num_workers: '3', bucket_random_ratio: 5e-2}\n")
    cfg = load_config(str(path))
    assert (cfg.lr, cfg.weight_decay, cfg.updates, cfg.mesh.fsdp) == (1e-4, 1e-2, 1000, 2)
    assert cfg.data == {"source": "folder", "paths": ("imgs",), "num_workers": 3, "bucket_random_ratio": 0.05}
    assert DataConfig.from_dict(cfg.data_config()).paths == ("imgs",)


@pytest.mark.parametrize("override, message", [
    ("lr=abc", "lr must be a number, got 'abc'"), ("lr=true", "lr must be a number, got True"),
    ("updates=2.5", "updates must be an integer, got 2.5"), ("updates=ten", "updates must be an integer, got 'ten'"),
    ("adaptive_loss_weight=maybe", "adaptive_loss_weight must be true or false, got 'maybe'"),
    ("mesh.fsdp=x", "mesh.fsdp must be an integer, got 'x'"),
    ("data.num_workers=two", "data.num_workers must be an integer, got 'two'"),
    ("data.bucket_random_ratio=abc", "data.bucket_random_ratio must be a number, got 'abc'"),
    ("experiment_id=[1]", r"experiment_id must be a string, got \[1\]"),
    ("webdataset_path={x: 1}", r"webdataset_path must be a list \(or a single value\), got \{'x': 1\}"),
    ("controlnet_blocks=[0, a]", r"controlnet_blocks\[1\] must be an integer, got 'a'"),
    ("model_config=[1]", r"model_config must be a string or a mapping, got \[1\]"),
    ("lr=[1", r"override 'lr=\[1': the value is not valid YAML \(expected ',' or '\]', but got '<stream end>' "
              r"at character 3 of the value\)"),
])
def test_unreadable_values_are_refused_by_name(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny_c", [override])


def test_the_trainer_refuses_before_building_anything(monkeypatch, capsys):
    import cascade_jax.training as training

    def must_not_run(*args, **kwargs):
        raise AssertionError("the trainer started with a config it cannot read")

    monkeypatch.setattr(training, "train", must_not_run)
    assert cli.main(["tiny_c", "lr=abc"], "c") == 2  # one error line, no traceback
    assert "lr must be a number, got 'abc'" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["/data/x.tar", "pipe:curl -s https://host/x.tar", "s3://bucket/x-{000..009}.tar"])
def test_one_webdataset_path_is_one_path(path, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"webdataset_path: '{path}'\n")
    for cfg in (load_config(str(config_file)), load_config("tiny_c", [f"webdataset_path={path}"]),
                config_from_dict({"webdataset_path": path})):
        assert cfg.webdataset_path == (path,)
        assert cfg.data_config()["paths"] == [path]


# train_tokens is a list of [token, init regex] pairs: its entries are lists themselves.
@pytest.mark.parametrize("key", sorted(LIST_KEYS - {"train_tokens", "lora.train_tokens"}))
def test_every_list_key_takes_one_value_or_a_list(key):
    section, _, name = key.rpartition(".")
    # (values the range checks accept: a ratio, a ResBlock index, a latent side)
    one = {"controlnet_blocks": 3, "pyramid_noise_sizes": 1, "multi_aspect_ratio": "9/16"}.get(name, "one value")

    def read(value):
        if section == "data":
            return config_from_dict({section: {"source": "folder", "paths": ["imgs"], name: value}}).data[name]
        if section:  # a task section, nested (lora: {module_filters: ...}); flat below
            return getattr(getattr(config_from_dict({section: {name: value}}), section), name)
        return config_from_dict({name: value}).get(name)

    assert read(one) == (one,) and read([one, one]) == (one, one)


def test_train_tokens_are_pairs():
    cfg = config_from_dict({"train_tokens": [["[fernando]", "^dog</w>"], ["^snail", None]]})
    assert cfg.lora.train_tokens == (("[fernando]", "^dog</w>"), ("^snail", None))


def test_data_config_takes_one_path_and_one_filter(tmp_path):
    cfg = DataConfig(source="folder", paths=tmp_path, filters="width>=768")
    assert cfg.paths == (str(tmp_path),) and cfg.filters == ("width>=768",)
    shard = tmp_path / "x-000.tar"
    shard.write_bytes(b"")
    assert expand_shards(str(shard)) == [str(shard)]
    with pytest.raises(ValueError, match="'pipe:curl -s x.tar': a 'pipe:' command is a stream"):
        expand_shards("pipe:curl -s x.tar")


def test_webdataset_path_may_be_a_yaml_list_of_shards(tmp_path):
    # The official trainer's third form: webdataset_path: shards.yml, a YAML file listing the shards.
    for i in range(3):
        (tmp_path / f"x-{i:03d}.tar").write_bytes(b"")
    listing = tmp_path / "shards.yml"
    listing.write_text(f"- {tmp_path}/x-000.tar\n- {tmp_path}/x-{{001..002}}.tar\n")
    assert expand_shards(str(listing)) == [str(tmp_path / f"x-{i:03d}.tar") for i in range(3)]
    assert expand_shards([str(listing), str(tmp_path / "x-000.tar")]) == expand_shards(str(listing))
    (tmp_path / "bad.yml").write_text("{a: 1}\n")
    with pytest.raises(ValueError, match="bad.yml' must hold a YAML list of shard paths"):
        expand_shards(str(tmp_path / "bad.yml"))
    with pytest.raises(FileNotFoundError, match="missing.yml': no such shard list file"):
        expand_shards(str(tmp_path / "missing.yml"))


@pytest.mark.parametrize("raw, value", [
    ("[/d/x-{000..009}.tar]", ["/d/x-{000..009}.tar"]), ("/d/x-{000..009}.tar", "/d/x-{000..009}.tar"),
    ("{a,b}.tar", "{a,b}.tar"), ("[/d/{a,b}/x-{0..3}.tar, /e/y.tar]", ["/d/{a,b}/x-{0..3}.tar", "/e/y.tar"]),
    ("{source: webdataset, paths: [/data/part-{000..099}.tar]}",
     {"source": "webdataset", "paths": ["/data/part-{000..099}.tar"]}),
    ("{resize: 5, x: [1, 2]}", {"resize": 5, "x": [1, 2]}), ("{}", {}), ("5e-4", 5e-4),
])
def test_brace_ranges_in_override_values_stay_text(raw, value):
    assert load_override_value(raw) == value


def test_a_brace_range_expanded_by_the_shell_means_every_shard(tmp_path):
    for i in range(3):
        (tmp_path / f"x-{i:03d}.tar").write_bytes(b"")
    pattern = f"{tmp_path}/x-{{000..002}}.tar"
    unquoted = f"webdataset_path=[{pattern}] lr=1e-4 webdataset_path=[{tmp_path}/x-000.tar]"
    for line, count in ((f"webdataset_path=[{pattern}]", 3), (f"webdataset_path={pattern}", 3), (unquoted, 5)):
        argv = subprocess.run(["bash", "-c", f"printf '%s\\n' {line}"], capture_output=True, text=True,
                              check=True).stdout.split()
        assert len(argv) == count  # what the program receives from bash
        cfg = load_config("tiny_c", argv)
        assert expand_shards(cfg.data_config()["paths"]) == [str(tmp_path / f"x-{i:03d}.tar") for i in range(3)]
    quoted = load_config("tiny_c", [f"webdataset_path=[{pattern}]"])  # as a quoted argument arrives
    assert quoted.webdataset_path == (pattern,) and len(expand_shards(quoted.webdataset_path)) == 3
    assert load_config("tiny_c", ["lr=1e-4", "lr=2e-4"]).lr == 2e-4  # a scalar key: the last one


def test_direct_construction_is_read_the_same():
    cfg = TrainConfig(lr="5e-4", updates="1_000", webdataset_path="/d/x.tar", train_filter=None)
    assert (cfg.lr, cfg.updates, cfg.webdataset_path, cfg.train_filter) == (5e-4, 1000, ("/d/x.tar",), ())


def test_task_sections_load_flat_as_officially_or_nested_and_store_flat():
    """LoRA / ControlNet / reconstruction keys live in their task's section (cfg.lora.rank); the official flat
    keys and the nested form load the same config, and a checkpoint stores the flat keys."""
    flat = config_from_dict({"rank": 8, "controlnet_blocks": [0, 4], "offset_noise": 0.1, "l1_weight": 0.5})
    nested = config_from_dict({"lora": {"rank": 8}, "controlnet": {"controlnet_blocks": [0, 4], "offset_noise": 0.1},
                               "reconstruction": {"l1_weight": 0.5}})
    assert flat == nested and flat.lora.rank == 8 and flat.controlnet.controlnet_blocks == (0, 4)
    assert flat.get("rank") == 8 and flat.get("l1_weight") == 0.5 and flat.get("lr") == flat.lr
    stored = flat.to_dict()
    assert stored["rank"] == 8 and stored["offset_noise"] == 0.1 and "lora" not in stored
    assert config_from_dict({k: v for k, v in stored.items() if k not in ("mesh",)}) == flat
    with pytest.raises(ValueError, match="rank is given both at the top level and in lora"):
        config_from_dict({"rank": 8, "lora": {"rank": 4}})
    with pytest.raises(ValueError, match="lora: unknown config key 'rnak'; did you mean 'rank'"):
        config_from_dict({"lora": {"rnak": 4}})
    with pytest.raises(ValueError, match="rank=0"):
        config_from_dict({"lora": {"rank": 0}})
