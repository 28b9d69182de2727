"""Two clp-ray processes (or threads) doing the same thing at once, and outputs other users read."""

import os
import threading
import time

import pytest

from clp_ray.util.atomic import atomic_path


def test_outputs_keep_the_mode_of_the_file_they_replace_or_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "new.json") as tmp:
            tmp.write_text("{}")
        assert oct((tmp_path / "new.json").stat().st_mode & 0o777) == oct(0o644)  # mkstemp alone gives 0600
        shared = tmp_path / "shared.json"
        shared.write_text("old")
        shared.chmod(0o664)
        with atomic_path(shared) as tmp:
            tmp.write_text("new")
        assert oct(shared.stat().st_mode & 0o777) == oct(0o664) and shared.read_text() == "new"
        with atomic_path(tmp_path / "folder", is_dir=True) as tmp:
            (tmp / "a").write_text("x")
        assert oct((tmp_path / "folder").stat().st_mode & 0o777) == oct(0o755)  # mkdtemp alone gives 0700
    finally:
        os.umask(old)


def _concurrently(fn, n=2):
    """Run ``fn(i)`` in ``n`` threads released together; their exceptions, if any."""
    barrier, errors = threading.Barrier(n), []

    def run(i):
        barrier.wait()
        try:
            fn(i)
        except Exception as e:  # collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_a_cache_built_twice_at_once_is_never_moved_aside(tmp_path):
    """The second builder used to move the first one's published folder aside and put its own in:
    a reader in between found no folder, and a reader of the first one lost files under it."""
    target = tmp_path / "cache" / "model"
    seen = []

    def build(i):
        with atomic_path(target, is_dir=True, keep_existing=True) as tmp:
            (tmp / "config.json").write_text(str(i))
            time.sleep(0.2 * i)  # the second finishes after the first has published
        seen.append(os.stat(target).st_ino)

    assert _concurrently(build) == []
    assert len(set(seen)) == 1 and (target / "config.json").is_file()  # the first folder stayed
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no temp or old folder left behind


def test_the_same_checkpoint_copied_twice_at_once(tmp_path):
    from clp_ray.util.storage import local_folder

    ckpt = tmp_path / "storage" / "run" / "checkpoint_1"
    (ckpt / "model").mkdir(parents=True)
    for i in range(20):
        (ckpt / "model" / f"w{i}.bin").write_bytes(os.urandom(200_000))
    uri = f"file://{ckpt}"
    got = []
    assert _concurrently(lambda i: got.append(local_folder(uri, tmp_path / "copies"))) == []
    assert got[0] == got[1] and len(list((got[0] / "model").iterdir())) == 20
    assert [p.name for p in (tmp_path / "copies").iterdir()] == [got[0].name]


def test_a_second_identical_run_is_refused_while_the_first_runs(tmp_path, small_data):
    from clp_ray.config import load_config
    from clp_ray.errors import ClpRayError
    from clp_ray.train import prepare, run_lock, run_training
    from clp_ray.util.locks import exclusive

    cfg = load_config("ko", "tiny", [f"data.train_paths=[{small_data}]", "data.train_group_size=2",
                                     f"train.output_dir={tmp_path / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    prep = prepare(cfg)
    with run_lock(cfg, prep.name):  # the first command, still running
        with pytest.raises(ClpRayError, match=rf"run {prep.name} is already running in process {os.getpid()}"):
            run_training(cfg)
    with exclusive(tmp_path / "out" / prep.name / ".lock", "run"):
        pass  # released with its holder


def test_run_names_follow_the_data(tmp_path, small_data):
    from clp_ray.config import load_config
    from clp_ray.train import prepare
    from clp_ray.tune import sweep_name

    sets = ["data.train_group_size=2", f"train.output_dir={tmp_path / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    data = tmp_path / "train.jsonl"
    data.write_bytes(small_data.read_bytes())
    cfg = load_config("ko", "tiny", [f"data.train_paths=[{data}]", *sets])
    first = prepare(cfg)
    assert prepare(cfg).name == first.name  # the same command on the same data resumes
    data.write_bytes(small_data.read_bytes().split(b"\n", 1)[1])  # one record fewer: another run
    second = prepare(cfg)
    assert second.name != first.name and second.name.startswith("train-ko-")
    assert sweep_name(cfg, second.data_hash) != sweep_name(cfg, first.data_hash)


def test_the_refusal_comes_before_any_cluster_work(tmp_path, small_data):
    import ray

    from clp_ray.config import load_config
    from clp_ray.errors import ClpRayError
    from clp_ray.train import prepare, run_lock, run_training

    cfg = load_config("ko", "tiny", [f"data.train_paths=[{small_data}]", "data.train_group_size=2",
                                     f"train.output_dir={tmp_path / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    with run_lock(cfg, prepare(cfg).name), pytest.raises(ClpRayError, match="is already running"):
        run_training(cfg)
    assert not ray.is_initialized()
