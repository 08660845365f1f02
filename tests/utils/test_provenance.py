import subprocess

from knsparse.utils.provenance import git_commit


def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_dirty_means_modified_tracked_files_or_new_python_files(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "old.json").write_text("{}")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_commit(tmp_path / "pkg")
    assert len(clean) == 40 and not clean.endswith("+dirty")
    (tmp_path / "result.json").write_text("{}")  # a fresh benchmark result is not a code change
    (tmp_path / "bench" / "results" / "old.json").write_text('{"rerun": 1}')  # nor a regenerated one
    assert git_commit(tmp_path / "pkg") == clean
    (tmp_path / "new_script.py").write_text("print()\n")  # outside pkg/: found from the repo root
    assert git_commit(tmp_path / "pkg") == clean + "+dirty"
    (tmp_path / "new_script.py").unlink()
    (tmp_path / "pkg" / "mod.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "pkg") == clean + "+dirty"


def test_outside_a_checkout(tmp_path):
    assert git_commit(tmp_path).startswith("unknown")
