from kfp_finetune.storage.workspace import Workspace, install, read_manifest, staged


def test_staging_removes_leftovers_of_a_killed_attempt_only(tmp_path):
    ws = Workspace.at(tmp_path)
    killed = tmp_path / ".staging" / "export-model-0123abcd"
    other = tmp_path / ".staging" / "export-model-v2-0123abcd"
    for folder in (killed, other):
        folder.mkdir(parents=True)
        (folder / "half.safetensors").write_bytes(b"x")
    fresh = ws.staging("export-model")
    assert fresh.is_dir() and not killed.exists() and other.exists()


def test_install_is_all_or_nothing(tmp_path):
    ws = Workspace.at(tmp_path)
    final = tmp_path / "model"
    with staged(ws, "model") as staging:
        (staging / "a.txt").write_text("new")
        install(staging, final, {"source": "x"})
    assert read_manifest(final) == {"source": "x"}
    assert (final / "a.txt").read_text() == "new"
    assert not list((tmp_path / ".staging").iterdir())
