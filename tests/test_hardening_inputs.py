"""The second pass of bad input (issue 37), one test per class: each ends in one clear message and
exit 2 (or a counted refusal), never a traceback, a hang, a silent coercion or lost data."""

import json
import os
import shutil
import time

import pytest
from conftest import run_in_process

from clp_ray.config import load_config, load_yaml_layer
from clp_ray.errors import ClpRayError, ConfigError, DataError

# ------------------------------------------------------------------ YAML alias bombs


def _bomb(levels: int = 9, width: int = 10) -> str:
    names = "abcdefghijklmnop"
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['x'] * width)}]"]
    for prev, name in zip(names, names[1:levels]):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("doc", [
    "train:\n  " + _bomb().replace("\n", "\n  "),                 # a nested section of aliases: 10^9 nodes
    "lam: &a [*a]\n",                                            # an alias inside itself
    "a: &a {x: 1, y: 1}\n" + "".join(f"{k}: &{k} {{l: *{p}, r: *{p}}}\n"  # a mapping bomb: 2^40
                                       for p, k in zip(["a"] + [f"m{i}" for i in range(40)], [f"m{i}" for i in range(40)])),
])
def test_a_yaml_alias_bomb_in_a_config_file_is_refused_at_once(tmp_path, doc):
    path = tmp_path / "bomb.yaml"
    path.write_text(doc)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml: refused: .*(more than 100,000 nodes|contains it)"):
        load_yaml_layer(path)
    assert time.perf_counter() - started < 5


def test_a_yaml_alias_bomb_in_a_set_value_and_on_the_cli_is_exit_2():
    cfg = load_config("ko", "tiny", ["data.train_paths=[&a pkg://ko_help/train.jsonl, *a]"])  # a plain alias
    assert cfg.data.train_paths == ["pkg://ko_help/train.jsonl"] * 2
    bomb = "{" + _bomb(8).replace("\n", ", ").rstrip(", ") + "}"
    with pytest.raises(ConfigError, match=r"--set .*refused: YAML aliases expand to more than 100,000 nodes"):
        load_config("ko", "tiny", [f"search.space={bomb}"])
    p = run_in_process("train.py", "--lang", "ko", "--profile", "tiny", "--set", f"search.space={bomb}", "--print-config")
    assert p.returncode == 2 and "refused" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------ strict scalars, conflicting --sets, env


@pytest.mark.parametrize("assignment, expected", [
    ("train.max_steps=true", "train.max_steps: Value error, expected int, not a boolean"),
    ("loss.lam=false", "loss.lam: Value error, expected float, not a boolean"),
    ("ray.use_gpu=2", "ray.use_gpu: Value error, expected true or false, not a number"),
    ("ray.use_gpu=0", "ray.use_gpu: Value error, expected true or false, not a number"),
])
def test_set_values_are_not_coerced_between_booleans_and_numbers(assignment, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("ko", "tiny", [assignment])
    assert load_config("ko", "tiny", ["train.max_steps=5", "ray.use_gpu=false"]).train.max_steps == 5


def test_conflicting_sets_name_both():
    for sets in (["ray=5", "ray.num_workers=2"], ["ray.num_workers=2", "ray=5"]):
        with pytest.raises(ConfigError) as e:
            load_config("ko", "tiny", sets)
        assert all(f"--set '{s}'" in str(e.value) for s in sets) and "conflict" in str(e.value)
    assert load_config("ko", "tiny", ["loss.lam=0.2", "loss.lam=0.3"]).loss.lam == 0.3  # the same key: later wins


@pytest.mark.parametrize("value, expected", [("", "CLP_RAY_PROFILE is set but empty"),
                                             ("tinyy", "CLP_RAY_PROFILE = 'tinyy' names no profile")])
def test_a_bad_clp_ray_profile_names_the_variable(monkeypatch, value, expected):
    monkeypatch.setenv("CLP_RAY_PROFILE", value)
    p = run_in_process("train.py", "--lang", "ko", "--print-config")
    assert p.returncode == 2 and expected in p.stderr and "known profiles: " in p.stderr
    assert run_in_process("train.py", "--lang", "ko", "--profile", "tiny", "--print-config").returncode == 0
    monkeypatch.setenv("CLP_RAY_PROFILE", "tiny")
    p = run_in_process("train.py", "--lang", "ko", "--print-config")
    assert p.returncode == 0 and "name_or_path: tiny" in p.stdout


# ------------------------------------------------------------------ model folders


@pytest.fixture()
def folder(tmp_path, tiny_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_path, out)
    return out


def _break(folder, how):
    if how == "no tokenizer":
        for f in folder.iterdir():
            if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
                f.unlink()
    elif how in ("empty weights", "truncated weights", "garbage header"):
        w = folder / "model.safetensors"
        data = w.read_bytes()
        w.write_bytes({"empty weights": b"", "truncated weights": data[: len(data) // 2],
                       "garbage header": b"\xff" * 8 + b"not a header" + data[20:]}[how])
    elif how == "sizes":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    elif how == "config not json":
        (folder / "config.json").write_text("{not json")
    elif how.startswith("meta "):
        (folder / "clp_ray.json").write_text(how.removeprefix("meta "))


@pytest.mark.parametrize("how, expected", [
    ("no tokenizer", "no tokenizer files"),
    ("empty weights", "model.safetensors: not a readable safetensors file"),
    ("truncated weights", "model.safetensors: not a readable safetensors file"),
    ("garbage header", "model.safetensors: not a readable safetensors file"),
    ("sizes", "config.json does not match the weights: encoder.layer.0.intermediate.dense.bias is [128] in "
              "model.safetensors, config.json implies [256]"),
    ("config not json", "config.json: unreadable"),
    ('meta {"poolng": "mean"}', "clp_ray.json: invalid model settings: poolng: unknown key (did you mean pooling?)"),
    ('meta {"query_max_len": "64"}', "clp_ray.json: invalid model settings: query_max_len: Input should be a valid integer"),
    ('meta {"normalize": 1}', "clp_ray.json: invalid model settings: normalize: Input should be a valid boolean"),
    ("meta [1, 2]", "clp_ray.json: must be a JSON object of model settings, got list"),
])
def test_a_broken_model_folder_is_one_message_naming_the_file(folder, how, expected):
    from clp_ray.model.embedder import Embedder

    _break(folder, how)
    with pytest.raises(ClpRayError) as e:
        Embedder.from_pretrained(folder)
    assert expected in str(e.value)
    p = run_in_process("evaluate.py", "--profile", "tiny", "--model", str(folder))
    assert p.returncode == 2 and expected in p.stderr and "Traceback" not in p.stderr


def test_max_lengths_past_the_models_positions_fail_before_ray_starts(tmp_path):
    # 66 positions hold 64 tokens (XLM-R reserves pad_token_id + 1); the tiny profile asks for 128.
    p = run_in_process("train.py", "--lang", "ko", "--profile", "tiny", "--set", "model.tiny.max_position_embeddings=66",
                       "--set", f"train.output_dir={tmp_path}")
    assert p.returncode == 2 and "has position embeddings for only 64 tokens" in p.stderr, p.stderr
    assert "set model.passage_max_len <= 64" in p.stderr and "Traceback" not in p.stderr
    p = run_in_process("train.py", "--lang", "ko", "--profile", "tiny", "--set", "model.tiny.max_position_embeddings=66",
                       "--set", "model.passage_max_len=64", "--set", "model.query_max_len=80",
                       "--set", f"train.output_dir={tmp_path}")
    assert p.returncode == 2 and "model.query_max_len = 80 (--set model.query_max_len=80): " in p.stderr  # cited


# ------------------------------------------------------------------ training data and mining


def _line(**kw):
    rec = {"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "neg_q": ["nq1", "nq2"], **kw}
    return json.dumps(rec)


@pytest.mark.parametrize("record, expected", [
    (_line(neg=["n1", " p "]), "neg: item 1 is the same text as pos item 0"),
    (_line(neg_q=["nq1", "q"]), "neg_q: item 1 is the record's own query"),
])
def test_the_validator_refuses_a_positive_among_negatives_and_the_query_as_neg_q(tmp_path, record, expected):
    from clp_ray.data import validate

    path = tmp_path / "t.jsonl"
    path.write_text(_line() + "\n" + record + "\n")
    report = validate([str(path)], require_neg_q=True, group_size=2, on_bad_record="skip")
    assert report.good == 1 and report.bad == 1
    assert f"{report.problems[0].field}: {report.problems[0].reason}".startswith(expected.split(": ")[0])
    assert expected.split(": ", 1)[1] in report.problems[0].reason


@pytest.mark.parametrize("inside_folder", [False, True])
def test_a_fifo_named_jsonl_is_refused_not_read_forever(tmp_path, inside_folder):
    from clp_ray.data import validate

    (tmp_path / "good.jsonl").write_text(_line() + "\n")
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(DataError, match="pipe.jsonl: not a regular file"):
        validate([str(tmp_path if inside_folder else tmp_path / "pipe.jsonl")], require_neg_q=True, group_size=2)


def test_mining_never_writes_a_negative_identical_to_the_positive(tiny_embedder):
    from clp_ray.config import MiningConfig
    from clp_ray.mining import mine

    corpus = {"d1": "the answer", "d1-copy": "the answer", "d2": "other text", "d3": "more text", "d4": "unrelated"}
    queries = {"q1": "question one", "q2": "question two"}
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d1-copy": 1}}
    cfg = MiningConfig(top_k=5, negatives_per_query=4, rank_window=(1, 5), margin=1.0, margin_mode="absolute",
                       generator={"kind": "none"})
    doc_ids, qids = list(corpus), list(queries)
    d = tiny_embedder.encode([corpus[i] for i in doc_ids], kind="passage")
    q = tiny_embedder.encode([queries[i] for i in qids], kind="query")
    # Scores far below the positive: only the text guard can keep d1-copy out of q1's negatives.
    records, stats = mine(q - 10 * d.mean(0), d, qids, doc_ids, queries, corpus, qrels, cfg)
    for rec in records:
        assert not set(rec["neg"]) & set(rec["pos"]), rec
    assert stats.candidates_same_text >= 1


# ------------------------------------------------------------------ evaluation data and served text


def _beir(tmp_path, queries, qrels, corpus=('{"_id": "d1", "text": "x"}',)):
    (tmp_path / "qrels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    (tmp_path / "queries.jsonl").write_text("\n".join(queries) + "\n")
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{r}\n" for r in qrels))
    return tmp_path


def test_evaluation_data_checks(tmp_path, caplog):
    from clp_ray.evaluation import load_beir

    big = _beir(tmp_path / "big", ['{"_id": "q1", "text": "a"}'], [f"q1\td1\t{2**40}"])
    with pytest.raises(DataError, match=r"test.tsv:2: relevance '1099511627776' does not fit a 32-bit integer grade"):
        load_beir(big)
    huge = _beir(tmp_path / "huge", ['{"_id": "q1", "text": "a"}'], [f"q1\td1\t{'9' * 100}"])
    with pytest.raises(DataError, match=r"does not fit a 32-bit integer grade"):
        load_beir(huge)
    lone = _beir(tmp_path / "lone", ['{"_id": "q1", "text": "a \\ud800"}'], ["q1\td1\t1"])
    with pytest.raises(DataError, match=r"queries.jsonl:1: text: holds a lone surrogate"):
        load_beir(lone)
    zeros = _beir(tmp_path / "zeros", ['{"_id": "q1", "text": "a"}'], ["q1\td1\t0"])
    with caplog.at_level("WARNING"):
        load_beir(zeros)
    assert "all of 1 queries have no relevant document" in caplog.text


def test_served_and_pyfunc_text_with_a_lone_surrogate_is_a_400_naming_the_item():
    from clp_ray.serving.openai_api import ApiError, RequestLimits, parse_request
    from clp_ray.tracking.pyfunc import BadInput, _as_text_list

    with pytest.raises(BadInput, match="item 1 holds a lone surrogate"):
        _as_text_list(["ok", "bad \ud800"])
    with pytest.raises(ApiError) as e:
        parse_request(b'{"model": "m", "input": ["ok", "bad \\ud800"]}', RequestLimits(16))
    assert e.value.status == 400 and e.value.body["error"]["param"] == "input[1]"


def test_embedder_encode_names_the_item_with_a_lone_surrogate(tiny_embedder):
    with pytest.raises(ValueError, match="item 2 holds a lone surrogate"):
        tiny_embedder.encode(["a", "b", "c\udc80"])
