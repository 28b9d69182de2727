"""Training data a hostile or careless user hands the validator: every input gets a
file:line: field: reason (never a traceback), and nothing rejected is lost."""

import base64
import gzip
import json
import logging
import subprocess
import sys

import pytest

from clp_ray.data import load_records, validate
from clp_ray.errors import DataError

GOOD = {"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "neg_q": ["nq1", "nq2"]}
G = json.dumps(GOOD).encode()


def write(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def reasons(report):
    return [f"{p.line}: {p.field}: {p.reason}" for p in report.problems]


@pytest.mark.parametrize("line, expected", [
    (json.dumps({**GOOD, "pos_scores": [int("9" * 400)]}).encode(), "pos_scores: contains NaN, infinity or a number too large"),
    (b'{"query": "q", "pos": ["p"], "pos_scores": [' + b"1" * 5000 + b"]}", "<line>: unreadable JSON: Exceeds the limit"),
    (b"[" * 100_000 + b"]" * 100_000, "<line>: JSON nested too deeply"),
    (b'{"query": "\\ud800", "pos": ["p"], "neg": ["n"], "neg_q": ["x"]}', "query: holds a lone surrogate"),
    (b'{"query": "q", "pos": ["p\\udfff"], "neg": ["n"], "neg_q": ["x"]}', "pos: item 0 holds a lone surrogate"),
])
def test_values_python_or_arrow_cannot_hold_are_reported(tmp_path, line, expected):
    path = write(tmp_path / "t.jsonl", [G, line])
    report = validate([str(path)], require_neg_q=True, group_size=2, max_line_bytes=10**6, on_bad_record="skip")
    assert report.good == 1 and len(report.problems) == 1
    assert reasons(report)[0].startswith("2: ") and expected in reasons(report)[0]
    assert len(load_records(report, require_neg_q=True, group_size=2, max_line_bytes=10**6, cache_dir=str(tmp_path / "c"))) == 1


def test_a_byte_order_mark_does_not_reject_the_first_record(tmp_path):
    path = write(tmp_path / "t.jsonl", [b"\xef\xbb\xbf" + G, G.replace(b'"q"', b'"q2"')])
    report = validate([str(path)], require_neg_q=True, group_size=2)
    assert report.good == 2 and report.bad == 0


def test_rejects_keep_every_rejected_byte(tmp_path):
    invalid = b'{"query": "caf\xe9", "pos": ["p"]}'
    long_line = json.dumps({**GOOD, "query": "x" * 5000}).encode()
    path = write(tmp_path / "t.jsonl", [G, invalid, long_line, b"not json"])
    rejects = tmp_path / "rejects.jsonl"
    report = validate([str(path)], require_neg_q=True, group_size=2, max_line_bytes=1000, on_bad_record="skip", rejects_path=rejects)
    assert report.bad == 3
    rows = {r["line"]: r for r in map(json.loads, rejects.read_text(encoding="utf-8").splitlines())}
    assert base64.b64decode(rows[2]["raw_base64"]) == invalid + b"\n" and "raw" not in rows[2]  # not UTF-8
    with open(rows[3]["raw_file"], "rb") as f:
        assert f.read() == long_line + b"\n"  # streamed to a sidecar, never held whole
    assert rows[4]["raw"] == "not json" and base64.b64decode(rows[4]["raw_base64"]) == b"not json\n"


def test_duplicates_are_counted_and_kept_dropped_or_rejected(tmp_path, caplog):
    other = G.replace(b'"q"', b'"other"')
    a = write(tmp_path / "a.jsonl", [G, other, G])
    kw = {"require_neg_q": True, "group_size": 2}
    with caplog.at_level(logging.WARNING, logger="clp_ray.data"):
        keep = validate([str(a), str(a)], **kw)  # the same file given twice, plus a repeated line
    assert (keep.good, keep.duplicates) == (6, 4) and "4 record(s) are duplicates" in caplog.text
    drop = validate([str(a), str(a)], on_duplicate="drop", **kw)
    assert (drop.good, drop.duplicates) == (2, 4)
    assert len(load_records(drop, max_line_bytes=10**6, cache_dir=str(tmp_path / "c"), **kw)) == 2
    with pytest.raises(DataError, match=r"a.jsonl:3: <record>: duplicate of .*a.jsonl:1 \(data.on_duplicate = error\)"):
        validate([str(a)], on_duplicate="error", **kw)


def test_gzip_files_are_read_and_misnamed_ones_are_explained(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    with gzip.open(folder / "part-0.jsonl.gz", "wb") as f:
        f.write(G + b"\n")
    write(folder / "part-1.jsonl", [G.replace(b'"q"', b'"q1"')])
    report = validate([str(folder)], require_neg_q=True, group_size=2)
    assert report.good == 2 and [f.rsplit("/", 1)[-1] for f in report.files] == ["part-0.jsonl.gz", "part-1.jsonl"]
    (tmp_path / "packed.jsonl").write_bytes(gzip.compress(G + b"\n"))
    with pytest.raises(DataError, match=r"packed.jsonl:0: <file>: gzip-compressed data in a file not named \*.gz"):
        validate([str(tmp_path / "packed.jsonl")], require_neg_q=True, group_size=2)


def test_cli_policy_and_rejects_flags(tmp_path):
    path = write(tmp_path / "t.jsonl", [G, b"not json"])

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "clp_ray.data", str(path), "--lam", "0.1", *args],
                              capture_output=True, text=True)

    p = cli("--on-bad-record", "error")
    assert p.returncode == 1 and "t.jsonl:2: <line>: malformed JSON" in p.stderr and "Traceback" not in p.stderr
    p = cli("--rejects", str(tmp_path / "r.jsonl"))
    assert p.returncode == 1 and json.loads((tmp_path / "r.jsonl").read_text())["raw"] == "not json"
    p = cli("--on-bad-record", "error", "--rejects", str(tmp_path / "r2.jsonl"))
    assert p.returncode == 2 and "--rejects needs --on-bad-record skip" in p.stderr
