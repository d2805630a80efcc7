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
