"""The set-up step for Detectron2 never fails where its repository is unreachable."""

from alrp_d2 import install_detectron2 as installer


def test_unreachable_upstream_warns_and_exits_zero(monkeypatch, capsys):
    monkeypatch.setattr(installer, "detectron2_importable", lambda: False)
    monkeypatch.setattr(installer, "reachable", lambda url, timeout=10.0: False)
    assert installer.main([]) == 0
    err = capsys.readouterr().err
    assert "could not be installed" in err and installer.PINNED_COMMIT in err
    assert installer.main(["--strict"]) == 1


def test_nothing_to_do_when_importable(monkeypatch, capsys):
    monkeypatch.setattr(installer, "detectron2_importable", lambda: True)
    assert installer.main([]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_failed_build_warns(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(installer, "detectron2_importable", lambda: False)
    monkeypatch.setattr(installer, "reachable", lambda url, timeout=10.0: True)
    monkeypatch.setattr(
        installer.subprocess,
        "run",
        lambda cmd, **kw: calls.append(cmd) or type("R", (), {"returncode": 1})(),
    )
    assert installer.main(["--commit", "abc123"]) == 0
    assert calls and calls[0][-1].endswith("@abc123") and "--no-build-isolation" in calls[0]
    assert "could not be installed" in capsys.readouterr().err


def test_lvis_is_installed_without_its_dependencies(monkeypatch, capsys):
    """lvis requires opencv-python, which would replace the headless cv2: --no-deps."""
    calls, present = [], []
    monkeypatch.setattr(installer, "detectron2_importable", lambda: True)
    monkeypatch.setattr(installer, "lvis_importable", lambda: bool(present))

    def pip(cmd, **kw):
        calls.append(cmd)
        present.append(True)
        return type("R", (), {"returncode": 0})()

    monkeypatch.setattr(installer.subprocess, "run", pip)
    assert installer.main(["--strict"]) == 0
    assert calls == [[installer.sys.executable, "-m", "pip", "install", "--no-deps", "lvis==0.5.3"]]
    assert installer.main([]) == 0 and len(calls) == 1  # importable now: nothing to do
    # A failed install warns, says how to install it, and fails only with --strict.
    present.clear()
    monkeypatch.setattr(
        installer.subprocess, "run", lambda cmd, **kw: type("R", (), {"returncode": 1})()
    )
    assert installer.main([]) == 0
    assert installer.LVIS_INSTALL in capsys.readouterr().err
    assert installer.main(["--strict"]) == 1
