"""Every expected failure of the command line is one line and exit status 2; Ctrl-C is 130; an
unexpected one is one line and 1, with the traceback behind ``--debug``."""

from __future__ import annotations

import pytest

from baddiff_core import cli
from baddiff_core.models import save_model
from baddiff_core.pretrained import load_clean_digits


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "clean"
    unet, scheduler = load_clean_digits()
    save_model(folder, unet, scheduler, metadata={"kind": "clean", "recipe": {"dataset": "digits"}})
    return folder


def run(argv, capsys) -> tuple[int, str]:
    status = cli.main(argv)
    return status, capsys.readouterr().err


def test_a_mistyped_local_path_is_not_looked_up_on_the_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, err = run(["sample", "./typo-model", "--output", "x.png"], capsys)
    assert status == 2 and "'./typo-model' does not exist" in err and len(err.strip().splitlines()) == 1


def test_a_corrupt_trigger_file_is_one_line(model_folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_folder, broken)
    (broken / cli.BACKDOOR_FILE).write_bytes(b"\x00" * 40)
    status, err = run(["evaluate", str(broken), "--n", "2", "--fd-samples", "0"], capsys)
    assert status == 2 and err.startswith("baddiff evaluate: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("failure, status, words", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to "
                  "allocate 1288490188800 bytes."), 2, "not enough memory"),
    (ValueError("x" * 20_000), 2, "[...]"),
    (ZeroDivisionError("division by zero"), 1, "internal error: ZeroDivisionError"),
])
def test_failures_inside_a_command(model_folder, tmp_path, capsys, monkeypatch, failure, status, words):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr("baddiff_core.sampling.sample", fail)
    code, err = run(["sample", str(model_folder), "--n", "2", "--output", str(tmp_path / "s.png")], capsys)
    assert code == status and words in err
    assert len(err.strip().splitlines()) == 1 and len(err) < 700 and "Traceback" not in err
    assert not (tmp_path / "s.png").exists()
    with pytest.raises(type(failure)):   # --debug: the traceback, for a bug report
        cli.main(["--debug", "sample", str(model_folder), "--n", "2", "--output", str(tmp_path / "s.png")])
