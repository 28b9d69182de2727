"""Outputs never overwrite inputs: every job's output paths go through one guard
(clp_ray.util.output_guard), and a refused output leaves every byte of the input as it was."""

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import run_in_process

from clp_ray.config import resolve_path
from clp_ray.errors import ConfigError
from clp_ray.util.output_guard import MARKER, check_outputs, mark_output, written_by


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def beir(tmp_path):
    """A small copy of the bundled Korean evaluation set (the guard must never touch it)."""
    src = Path(resolve_path("pkg://ko_help"))
    dst = tmp_path / "data"
    (dst / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/dev.tsv"):
        shutil.copy(src / name, dst / name)
    return dst


def test_the_guard_refuses_each_kind_of_overlap(tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    (data / "corpus.jsonl").write_text("x")
    (data / "old.json").write_text("y")
    ins = {"--corpus": data / "corpus.jsonl", "--model": data}
    cases = {
        "is the input --corpus": {"--out": data / "corpus.jsonl"},
        "is the input --model": {"--out": str(data) + "/./"},  # the same folder, spelt differently
        "is inside the input --model": {"--summary": data / "old.json"},  # exists: would replace an input's file
        "contains the input --corpus": {"--out": tmp_path},
        "are the same path": {"--out": tmp_path / "o.json", "--summary": tmp_path / "x" / ".." / "o.json"},
    }
    for expected, outs in cases.items():
        with pytest.raises(ConfigError, match=expected):
            check_outputs(outs, ins, folders=["--out"] if expected.startswith("contains") else ())
    # A new file next to the inputs, remote paths and unset outputs are fine.
    check_outputs({"--summary": data / "new.json", "--out": "s3://bucket/x", "--run-file": None}, ins)


def test_a_folder_output_replaces_only_what_the_same_job_wrote(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="non-empty folder not written by clp-ray.*--overwrite"):
        check_outputs({"--out": out}, {}, folders=["--out"], job="export")
    check_outputs({"--out": out}, {}, folders=["--out"], job="export", overwrite=True)
    mark_output(out, "mine")
    assert written_by(out) == "mine" and (out / MARKER).is_file()
    with pytest.raises(ConfigError, match="written by mine"):
        check_outputs({"--out": out}, {}, folders=["--out"], job="export")
    mark_output(out, "export")
    check_outputs({"--out": out}, {}, folders=["--out"], job="export")
    check_outputs({"--out": tmp_path / "empty"}, {}, folders=["--out"], job="export")


@pytest.mark.parametrize("target", ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"])
@pytest.mark.parametrize("flag", ["--run-file", "--summary"])
def test_evaluate_never_writes_over_its_evaluation_set(beir, tiny_path, flag, target):
    before = digest(beir)
    p = run_in_process("evaluate.py", "--profile", "tiny", "--model", str(tiny_path), "--data", str(beir),
                       flag, str(beir / target))
    assert p.returncode == 2 and "writing it would destroy the input" in p.stderr and "Traceback" not in p.stderr
    assert digest(beir) == before


@pytest.mark.parametrize("target", ["corpus", "queries", "qrels"])
def test_mine_never_writes_over_its_corpus_queries_or_qrels(beir, tiny_path, target):
    files = {"corpus": beir / "corpus.jsonl", "queries": beir / "queries.jsonl", "qrels": beir / "qrels" / "test.tsv"}
    before = digest(beir)
    p = run_in_process("mine.py", "--lang", "ko", "--profile", "tiny", "--model", str(tiny_path), "--corpus", str(files["corpus"]),
                       "--queries", str(files["queries"]), "--qrels", str(files["qrels"]), "--out", str(files[target]))
    assert p.returncode == 2 and f"is the input --{target}" in p.stderr, p.stderr
    p = run_in_process("mine.py", "--lang", "ko", "--profile", "tiny", "--model", str(tiny_path), "--data", str(beir),
                       "--split", "test", "--out", str(files[target]))
    assert p.returncode == 2 and f"is the input --data {target}: writing it would destroy the input" in p.stderr, p.stderr
    assert digest(beir) == before


def test_export_keeps_unrelated_folders_and_its_own_model(tmp_path, tiny_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    model_before = digest(model)
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    for out, expected in [(unrelated, "not written by clp-ray: it would be deleted and replaced; pass --overwrite"),
                          (model, "is the input --model"), (tmp_path, "contains the input --model")]:
        p = run_in_process("export.py", "--profile", "tiny", "--model", str(model), "--out", str(out))
        assert p.returncode == 2 and expected in p.stderr, p.stderr
    assert (unrelated / "cat.jpg").read_bytes() == b"\xff\xd8 a cat" and digest(model) == model_before
    # Its own previous export is replaced without --overwrite; the unrelated folder only with it.
    out = tmp_path / "st"
    for _ in range(2):
        assert run_in_process("export.py", "--profile", "tiny", "--model", str(model), "--out", str(out)).returncode == 0
    assert written_by(out) == "export"
    p = run_in_process("export.py", "--profile", "tiny", "--model", str(model), "--out", str(unrelated), "--overwrite")
    assert p.returncode == 0 and not (unrelated / "cat.jpg").exists() and (unrelated / "modules.json").is_file()


def test_the_validator_never_writes_its_rejects_over_its_data(tmp_path):
    from clp_ray.data import main

    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "q", "pos": ["p"], "neg": []}\nnot json\n', encoding="utf-8")
    before = data.read_bytes()
    assert main([str(data), "--group-size", "1", "--rejects", str(data)]) == 2
    assert main([str(tmp_path), "--group-size", "1", "--rejects", str(data)]) == 2  # a folder input holds it
    assert data.read_bytes() == before
    assert main([str(data), "--group-size", "1", "--rejects", str(tmp_path / "rejects.jsonl")]) == 1  # one bad line
    assert (tmp_path / "rejects.jsonl").read_text().count("\n") == 1
