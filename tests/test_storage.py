"""Run-storage locations: local folders and URIs (s3://, file://) as Ray reports them."""

from clp_ray.util.storage import folder_exists, join, local_folder, location, move_aside


def test_location_and_join_keep_scheme_and_options():
    # Ray reports S3 checkpoint paths without the scheme: bucket/prefix/...
    s3 = "s3://bucket/ray_results?endpoint_override=http://minio:9000"
    loc = location(s3, "bucket/ray_results/run/checkpoint_1")
    assert loc == "s3://bucket/ray_results/run/checkpoint_1?endpoint_override=http://minio:9000"
    assert join(loc, "model") == "s3://bucket/ray_results/run/checkpoint_1/model?endpoint_override=http://minio:9000"
    assert location("file:///data/ray", "/data/ray/run/c") == "file:///data/ray/run/c"
    assert location("/data/ray", "/data/ray/run/c") == "/data/ray/run/c"  # local storage: unchanged
    assert join("/data/ray/", "run") == "/data/ray/run"


def test_local_folder_copies_a_uri_once_and_leaves_local_paths(tmp_path):
    src = tmp_path / "storage" / "ckpt" / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0" * 10)
    assert local_folder(str(src), tmp_path / "cache") == src  # local: no copy
    uri = f"file://{src}"
    assert folder_exists(uri) and folder_exists(str(src)) and not folder_exists(f"file://{tmp_path / 'nope'}")
    copy = local_folder(uri, tmp_path / "cache")
    assert copy.parent == tmp_path / "cache" and copy.name.startswith("model-")
    assert (copy / "config.json").read_text() == "{}" and (copy / "sub" / "w.bin").read_bytes() == b"\0" * 10
    (src / "config.json").write_text('{"changed": 1}')
    assert local_folder(uri, tmp_path / "cache") == copy and (copy / "config.json").read_text() == "{}"  # reused
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [copy.name]  # no temp folder left behind


def test_move_aside_local_and_uri(tmp_path):
    (tmp_path / "sweep" / "trial").mkdir(parents=True)
    (tmp_path / "sweep" / "trial" / "state.json").write_text("{}")
    assert move_aside(str(tmp_path / "sweep"), "sweep.old-1") == str(tmp_path / "sweep.old-1")
    assert (tmp_path / "sweep.old-1" / "trial" / "state.json").read_text() == "{}" and not (tmp_path / "sweep").exists()
    uri = f"file://{tmp_path / 'sweep.old-1'}"
    assert move_aside(uri, "sweep.old-2") == f"file://{tmp_path / 'sweep.old-2'}"
    assert (tmp_path / "sweep.old-2" / "trial" / "state.json").is_file()
    assert move_aside(str(tmp_path / "missing"), "x") is None


def test_storage_path_is_absolute_and_checked_before_work(tmp_path, monkeypatch):
    import pytest

    from clp_ray.config import load_config
    from clp_ray.errors import ClpRayError
    from clp_ray.train import check_storage, storage_path

    monkeypatch.chdir(tmp_path)
    # A relative folder would be another folder in each worker's working directory.
    assert storage_path(load_config("hi", "tiny", ["train.storage_path=runs"])) == str(tmp_path / "runs")
    assert storage_path(load_config("hi", "tiny", ["train.output_dir=out"])) == str(tmp_path / "out" / "ray_results")
    uri = "s3://bucket/ray?endpoint_override=http://127.0.0.1:9"
    assert storage_path(load_config("hi", "tiny", [f"train.storage_path={uri}"])) == uri
    check_storage(load_config("hi", "tiny", ["train.storage_path=runs"]))
    check_storage(load_config("hi", "tiny", [f"train.storage_path=file://{tmp_path / 'uri-runs'}"]))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ClpRayError, match=r"train.storage_path = a-file/runs \(--set train.storage_path=a-file/runs\): "
                                          r"cannot write to .*a-file is a file, not a folder"):
        check_storage(load_config("hi", "tiny", ["train.storage_path=a-file/runs"]))
    # An S3 endpoint nobody answers on (port 9 refuses): an error naming the setting, no traceback.
    with pytest.raises(ClpRayError, match=r"train.storage_path = s3://bucket/ray\?endpoint_override=.*: cannot reach the run storage: "):
        check_storage(load_config("hi", "tiny", [f"train.storage_path={uri}", "ray.num_workers=2"]))
