"""bench/gpu.py, the CUDA acceptance check, in its tiny CPU form: every row PASSes or is a SKIP with a reason, and
the JSON holds the measured values, so the script cannot rot on machines without a GPU."""
import json
import math

import pytest
import torch

from bench import gpu


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread here and in every child process: on a shared 2-core machine, two threads per process
    fight the other jobs for the cores and run several times slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def falling(losses):
    return all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_cpu_form_passes_every_check_with_its_measured_values(tmp_path, one_thread):
    gpu.main(["--device", "cpu", "--output", str(tmp_path / "gpu.json")])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    rows = {}
    for r in saved["rows"]:
        assert r["status"] == "PASS" or (r["status"] == "SKIP" and r["reason"]), r
        rows.setdefault(r["check"], []).append(r)
    assert saved["passed"] and saved["device"] == "cpu" and list(rows) == list(gpu.CHECKS)

    train = {r["precision"]: r for r in rows["train"]}
    assert len(train["fp32"]["values"]["losses"]) == gpu.TRAIN_STEPS and falling(train["fp32"]["values"]["losses"])
    for precision in ("fp16 AMP + GradScaler", "bf16 AMP"):  # autocast is CUDA-only: skipped, never a PASS
        assert train[precision]["status"] == "SKIP" and train[precision]["reason"].startswith("CPU")

    assert [r["item"].split(" = ")[0] for r in rows["gradients"]] == ["cached_step, micro 4 of 16",
                                                                        "gradient checkpointing"]
    for r in rows["gradients"]:
        v = r["values"]
        assert v["tolerance"] == gpu.GRAD_TOL["fp32"] == 1e-4 and v["relative_error"] <= 1e-4
        assert v["loss"] == pytest.approx(v["plain_loss"], abs=1e-5)

    compiled, cached = rows["compile"]
    assert "backend eager" in compiled["item"] and len(compiled["values"]["losses"]) == len(gpu.COMPILE_PADDING)
    assert falling(compiled["values"]["losses"]) and falling(cached["values"]["losses"])
    assert cached["values"]["replay_cosine"] >= gpu.COSINE_MIN["cpu"]

    resumed, evals = rows["torchrun"]
    assert [e["epoch"] for e in resumed["values"]["epochs"]] == [0, 1]
    first, second = evals["values"]["evals"]  # eval.py twice on the CPU: identical to the last digit
    assert set(evals["values"]["gaps_in_queries"].values()) == {0}
    assert first["image_to_text"] == second["image_to_text"] and first["text_to_image"] == second["text_to_image"]
    assert first["rsum"] == second["rsum"] and first["num_images"] == 24

    encoder, onnx = rows["inference"]
    assert encoder["values"]["least_cosine"] >= gpu.COSINE_MIN["cpu"]
    assert onnx["values"]["image"].endswith("image_encoder.onnx") and onnx["values"]["text"].endswith(".onnx")

    memory = [r["values"] for r in rows["memory"]]
    assert [(m["batch"], m["micro"], m["checkpointing"]) for m in memory] == [(16, 0, False), (16, 4, False),
                                                                             (16, 0, True)]
    assert all(m["samples_per_s"] > 0 and m["total_peak_mib"] > 0 for m in memory)


def test_a_failing_row_is_reported_and_the_others_still_run(tmp_path, one_thread, monkeypatch):
    def broken(*args):
        raise RuntimeError("chunked step broke\nsecond line")

    monkeypatch.setattr(gpu, "cached_step", broken)
    with pytest.raises(SystemExit) as e:
        gpu.main(["--device", "cpu", "--only", "gradients", "--output", str(tmp_path / "g.json")])
    assert str(e.value.code).startswith("error: 1 row(s) FAILED: gradients: cached_step")
    cached, checkpointed = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert cached["status"] == "FAIL" and cached["reason"] == "RuntimeError: chunked step broke"
    assert "Traceback" in cached["values"]["traceback"] and checkpointed["status"] == "PASS"


def test_cuda_without_a_gpu_and_unknown_checks_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu.main(["--device", "cuda", "--output", str(tmp_path / "x.json")])
    message = str(e.value.code)
    assert message.startswith("error: --device cuda") and "--device cpu" in message and "\n" not in message
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(SystemExit) as e:
        gpu.main(["--device", "cpu", "--only", "train,gpu"])
    assert e.value.code == 2 and "--only takes a comma-separated subset of train," in capsys.readouterr().err


def test_rows_are_saved_as_they_finish_so_a_stopped_run_keeps_them(tmp_path, one_thread, monkeypatch, capsys):
    def stopped(*args):  # what a timeout's signal does in the middle of the gradients check
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu, "cached_step", stopped)
    with pytest.raises(SystemExit) as e:
        gpu.main(["--device", "cpu", "--only", "train,gradients", "--output", str(tmp_path / "g.json")])
    assert e.value.code == 130 and capsys.readouterr().err.splitlines()[-1].startswith("interrupted: files")
    saved = json.loads((tmp_path / "g.json").read_text())
    assert not saved["finished"] and not saved["passed"]
    assert [(r["check"], r["status"]) for r in saved["rows"]] == [("train", "PASS"), ("train", "SKIP"),
                                                                   ("train", "SKIP")]
    assert falling(saved["rows"][0]["values"]["losses"])


def test_the_replay_row_fails_when_pass_two_draws_other_dropout_masks(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(gpu, "set_rng_state", lambda state: None)  # the RNG is not restored between the passes
    with pytest.raises(SystemExit) as e:
        gpu.main(["--device", "cpu", "--only", "compile", "--output", str(tmp_path / "c.json")])
    assert "compile: 5 cached steps" in str(e.value.code)
    plain, cached = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert plain["status"] == "PASS" and cached["status"] == "FAIL"
    assert cached["values"]["replay_cosine"] < gpu.COSINE_MIN["cpu"]
