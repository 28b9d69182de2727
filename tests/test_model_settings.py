"""How a model embeds is resolved in one order (explicit > folder > defaults), and a config's
settings for its own model never overrule another model's folder."""

import json

import pytest

from clp_ray.config import load_config
from clp_ray.errors import ClpRayError
from clp_ray.model.settings import EmbedSettings, folder_settings, resolve


def st_folder(root, *, pooling=None, normalize=True, max_seq_length=200, prompts=None, extra_modules=()):
    """A sentence-transformers folder's settings files (no weights: resolution reads only these)."""
    root.mkdir(parents=True, exist_ok=True)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    modules += [{"idx": 9, "name": m, "path": m, "type": f"sentence_transformers.models.{m}"} for m in extra_modules]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir(exist_ok=True)
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling or {"pooling_mode_mean_tokens": True}))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    if prompts is not None:
        (root / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    return root


def test_sentence_transformers_files_are_read(tmp_path):
    folder = st_folder(tmp_path / "st", prompts={"query": "query: ", "document": "passage: "})
    r = resolve(folder)
    assert r.settings == EmbedSettings(pooling="mean", normalize=True, query_max_len=200, passage_max_len=200,
                                       query_prefix="query: ", passage_prefix="passage: ")
    assert r.sources["pooling"] == "1_Pooling/config.json" and r.sources["normalize"] == "modules.json"
    assert r.sources["passage_prefix"] == "config_sentence_transformers.json prompts.document"
    # The newer pooling format, and no Normalize module: not normalised (as sentence-transformers does).
    folder = st_folder(tmp_path / "st2", pooling={"pooling_mode": "cls"}, normalize=False)
    assert resolve(folder).settings.pooling == "cls" and resolve(folder).settings.normalize is False


def test_order_explicit_then_clp_ray_json_then_sentence_transformers_then_defaults(tmp_path):
    folder = st_folder(tmp_path / "m", max_seq_length=300, prompts={"query": "q: "})
    (folder / "clp_ray.json").write_text(json.dumps({"format": 2, "pooling": "cls", "query_max_len": 40}))
    r = resolve(folder, {"query_max_len": 20, "passage_prefix": None})
    assert r.settings.query_max_len == 20 and r.sources["query_max_len"] == "explicit"
    assert r.settings.pooling == "cls" and r.sources["pooling"] == "clp_ray.json"
    assert r.settings.passage_max_len == 300 and r.sources["passage_max_len"] == "sentence_bert_config.json"
    assert r.settings.query_prefix == "q: " and r.settings.passage_prefix == ""  # None = not set: defaults
    assert "passage_prefix" not in r.sources and "passage_prefix='' (defaults)" in r.describe()
    assert resolve(None).settings == EmbedSettings()


@pytest.mark.parametrize("make, message", [
    (lambda f: st_folder(f, extra_modules=["Dense"]), r"module\(s\) Dense are not supported"),
    (lambda f: st_folder(f, pooling={"pooling_mode_max_tokens": True}), "pooling mode 'max' is not supported"),
    (lambda f: st_folder(f, pooling={"pooling_mode": "mean", "include_prompt": False}), "include_prompt is false"),
])
def test_sentence_transformers_folders_clp_ray_cannot_reproduce_are_refused(tmp_path, make, message):
    folder = make(tmp_path / "m")
    with pytest.raises(ClpRayError, match=message):
        folder_settings(folder)


def test_lower_casing_folder_is_refused(tmp_path):
    folder = st_folder(tmp_path / "m")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": True}))
    with pytest.raises(ClpRayError, match="do_lower_case is true"):
        folder_settings(folder)


def test_profile_settings_apply_to_the_profile_model_only(tmp_path):
    local = load_config("hi", "local")
    assert local.model.explicit_settings() == {"pooling": "mean", "query_max_len": 32, "passage_max_len": 128,
                                               "query_prefix": "query: ", "passage_prefix": "passage: "}
    # Another model named with --set or --model: the profile's E5 settings and base.yaml's BGE-M3
    # ones give way to that model's folder; --set values still apply, wherever they stand.
    other = load_config("hi", "local", ["model.query_max_len=48", "model.name_or_path=/models/x"])
    assert other.model.explicit_settings() == {"query_max_len": 48}
    assert load_config("hi", "local", model="/models/x").model.explicit_settings() == {}
    # base.yaml's values describe BGE-M3, its own model.
    assert load_config("hi", "cluster").model.explicit_settings() == {"pooling": "cls", "normalize": True,
                                                                      "query_max_len": 64, "passage_max_len": 256}
    # The tiny profile names its model without settings: base.yaml's are not the tiny model's.
    assert load_config("hi", "tiny").model.explicit_settings() == {}


def test_a_settings_file_after_the_model_layer_applies(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("model:\n  pooling: cls\n")
    cfg = load_config("hi", "local", extra_files=[extra])
    assert cfg.model.pooling == "cls" and cfg.model.query_prefix == "query: "
