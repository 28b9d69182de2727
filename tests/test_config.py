import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from clp_ray.config import ExperimentConfig, default_config_dir, load_config
from clp_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cdir(tmp_path):
    d = tmp_path / "configs"
    shutil.copytree(default_config_dir(), d)
    return d


def test_repo_configs_resolve_for_every_language_and_profile():
    for lang in ("hi", "ko", "fa"):
        for profile in ("local", "tiny", "cluster"):
            cfg = load_config(lang, profile)
            assert isinstance(cfg, ExperimentConfig) and cfg.lang == lang
    tiny = load_config("hi", "tiny")
    assert tiny.model.name_or_path == "tiny" and tiny.ray.use_gpu is False
    local = load_config("hi", "local")
    assert local.model.name_or_path == "intfloat/multilingual-e5-small" and local.data.dev_split == "documents"
    assert load_config("hi", "cluster").model.name_or_path == "BAAI/bge-m3"


def test_layers_apply_in_order(cdir):
    (cdir / "lang" / "hi.yaml").write_text("loss:\n  temperature: 0.05\n  lam: 0.3\n")
    (cdir / "profiles" / "p.yaml").write_text("loss:\n  temperature: 0.07\n")
    cfg = load_config("hi", "p", ["loss.lam=0.4", "loss.lam=0.45", "moe.layers=[0, 2]"], config_dir=cdir)
    assert cfg.loss.temperature == 0.07  # profile over lang
    assert cfg.loss.lam == 0.45  # last --set wins
    assert cfg.moe.layers == [0, 2]  # YAML flow value
    assert cfg.moe.num_experts == 2  # untouched keys keep base values


def test_unknown_key_names_file_line_and_path(cdir):
    (cdir / "lang" / "hi.yaml").write_text("loss:\n  lam: 0.1\n  temprature: 0.05\n")
    with pytest.raises(ConfigError) as e:
        load_config("hi", None, config_dir=cdir)
    assert "hi.yaml:3: loss.temprature: unknown key" in str(e.value)


def test_unknown_key_suggests_a_near_miss_or_lists_the_section():
    with pytest.raises(ConfigError) as e:
        load_config("hi", "tiny", ["train.batch_size=3", "moe.router.jiter=0.1", "trian.epochs=1", "loss.nope=1"])
    msg = str(e.value)
    assert "train.batch_size: unknown key (did you mean per_device_batch_size?)" in msg
    assert "moe.router.jiter: unknown key (did you mean jitter?)" in msg  # nested section
    assert "trian: unknown key (did you mean train?)" in msg  # top level
    assert "loss.nope: unknown key; valid keys here: temperature, lam, cross_device_negatives" in msg
    # The sweep always ranks trials by dev nDCG@10: no key pretends otherwise and is silently ignored.
    with pytest.raises(ConfigError, match=r"--set search.metric=dev_mrr@10: search.metric: unknown key"):
        load_config("hi", "tiny", ["search.metric=dev_mrr@10"])


def test_wrong_type_and_out_of_range_name_source(cdir):
    (cdir / "profiles" / "p.yaml").write_text("train:\n  epochs: many\nmoe:\n  num_experts: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config("hi", "p", config_dir=cdir)
    msg = str(e.value)
    assert "p.yaml:2: train.epochs: Input should be a valid integer" in msg and "'many'" in msg
    assert "p.yaml:4: moe.num_experts: Input should be greater than or equal to 1" in msg


def test_set_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"--set loss.temperature=-1: loss.temperature: Input should be greater than 0"):
        load_config("hi", "tiny", ["loss.temperature=-1"])
    with pytest.raises(ConfigError, match=r"--set loss.nope=1: loss.nope: unknown key"):
        load_config("hi", "tiny", ["loss.nope=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config("hi", "tiny", ["loss.lam"])


def test_cross_field_rule_names_section():
    with pytest.raises(ConfigError, match=r"moe: Value error, top_k \(3\) must be <= num_experts \(2\)"):
        load_config("hi", "tiny", ["moe.top_k=3"])


def test_unknown_language_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown language 'xx'.*known languages: fa, hi, ko"):
        load_config("xx", "tiny")
    with pytest.raises(ConfigError, match=r"unknown profile 'gpu'.*known profiles: cluster, local, tiny"):
        load_config("hi", "gpu")
    # Files that exist, but outside lang/ and profiles/ (the language would name folders and runs).
    with pytest.raises(ConfigError, match=r"unknown language '\.\./profiles/local'.*known languages: fa, hi, ko"):
        load_config("../profiles/local", "local")
    with pytest.raises(ConfigError, match=r"unknown profile '\.\./lang/hi'"):
        load_config("hi", "../lang/hi")
    with pytest.raises(ConfigError, match=r"--set lang=a/b: lang: String should match pattern"):
        load_config("hi", "tiny", ["lang=a/b"])


def test_duplicate_key_is_an_error_not_a_silent_override(cdir):
    # YAML keeps the last `loss:` block, which would drop lam = 0.3 without a word.
    (cdir / "lang" / "hi.yaml").write_text("loss:\n  lam: 0.3\nmoe:\n  num_experts: 4\nloss:\n  temperature: 0.05\n")
    with pytest.raises(ConfigError, match=r"hi.yaml:5: loss: duplicate key \(first set at .*hi.yaml:1\)"):
        load_config("hi", None, config_dir=cdir)
    (cdir / "lang" / "hi.yaml").write_text("loss:\n  lam: 0.3\n  lam: 0.4\n")
    with pytest.raises(ConfigError, match=r"hi.yaml:3: loss.lam: duplicate key \(first set at .*hi.yaml:2\)"):
        load_config("hi", None, config_dir=cdir)
    # The same key in different files is layering, not duplication.
    (cdir / "lang" / "hi.yaml").write_text("loss:\n  lam: 0.3\n")
    assert load_config("hi", None, ["loss.lam=0.4"], config_dir=cdir).loss.lam == 0.4


def test_invalid_yaml_names_line(cdir):
    (cdir / "lang" / "hi.yaml").write_text("loss:\n  lam: [0.1\n")
    with pytest.raises(ConfigError, match=r"hi.yaml:3: invalid YAML"):
        load_config("hi", None, config_dir=cdir)


def test_cite_gives_value_and_origin_for_later_checks(cdir):
    (cdir / "profiles" / "p.yaml").write_text("# comment\nloss:\n  lam: 0.3\n")
    cfg = load_config("hi", "p", ["moe.layers=[99]"], config_dir=cdir)
    assert cfg.cite("moe.layers") == "moe.layers = [99] (--set moe.layers=[99])"
    assert cfg.cite("loss.lam").startswith("loss.lam = 0.3 (") and cfg.cite("loss.lam").endswith("p.yaml:3)")
    assert cfg.cite("moe.train_only").startswith("moe.train_only = moe (") and "base.yaml:" in cfg.cite("moe.train_only")
    # Left to its default: not the line of the section header above it.
    assert cfg.cite("model.tiny.num_layers") == "model.tiny.num_layers = 4 (defaults)"
    # A config rebuilt from a dict (e.g. a Tune trial's) knows values, not origins; equality ignores origins.
    again = ExperimentConfig.model_validate(cfg.to_dict())
    assert again.cite("loss.lam") == "loss.lam = 0.3" and again == cfg


def test_resolved_config_round_trips_and_hash_is_stable():
    cfg = load_config("hi", "tiny", ["loss.lam=0.2"])
    again = ExperimentConfig.model_validate(cfg.to_dict())
    assert again == cfg and again.config_hash() == cfg.config_hash()
    assert load_config("hi", "tiny", ["loss.lam=0.3"]).config_hash() != cfg.config_hash()
    assert cfg.flat()["loss.lam"] == 0.2
    assert Path(default_config_dir(), "base.yaml").exists()


@pytest.mark.parametrize("assignment, message", [
    ("train.seed=" + "9" * 5000, "unusable value: Exceeds the limit (4300 digits)"),
    ("train.seed=18446744073709551616", "train.seed: Input should be less than 4294967296"),  # torch.manual_seed refuses 2**64
    ("data.seed=-1", "data.seed: Input should be greater than or equal to 0"),
    ("moe.router.balance_coef=.inf", "moe.router.balance_coef: Input should be a finite number (got inf)"),
    ("ray.cpus_per_worker=.inf", "ray.cpus_per_worker: Input should be a finite number"),
    ("loss.lam=.nan", "loss.lam: Input should be a finite number (got nan)"),
    ("train.weight_decay=.inf", "train.weight_decay: Input should be a finite number"),
    ("search.lam=[0, .inf]", "search.lam.1: Input should be a finite number"),
])
def test_values_python_or_torch_cannot_use_fail_at_load(assignment, message):
    with pytest.raises(ConfigError) as e:
        load_config("hi", "tiny", [assignment])
    assert message in str(e.value) and len(str(e.value)) < 600


def test_a_huge_number_in_a_config_file_names_the_file(cdir):
    (cdir / "lang" / "hi.yaml").write_text("train:\n  seed: " + "7" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"lang/hi.yaml: unusable value: Exceeds the limit"):
        load_config("hi", "tiny", config_dir=cdir)


class _Documented(BaseModel):
    a: int = 1  # beside
    # above, line one
    # and line two
    b: str = "x"
    c: float = 0.5


def test_the_config_reference_is_current_and_every_key_has_a_comment():
    from clp_ray.config.reference import PAGE, field_comments, missing_comments, rows

    assert field_comments(_Documented) == {"a": "beside", "b": "above, line one and line two", "c": ""}
    assert missing_comments() == []
    keys = [k for k, *_ in rows(ExperimentConfig)]
    assert {"loss.lam", "loss.temperature", "moe.router.balance_coef", "eval.dev_source", "lang"} <= set(keys)
    page = PAGE.read_text()
    assert all(f"| `{k}` |" in page or f"\n## `{k}`\n" in page for k in keys)
    assert "| `loss.lam` | `float` | `0.1` | CLP weight λ" in page
    p = subprocess.run([sys.executable, "-m", "clp_ray.config.reference", "--check"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
