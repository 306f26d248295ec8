"""The GPU check runs end to end on a CPU at tiny sizes (a test that it works and reports every
figure, never a timing assertion), its equivalence checks fail when a path is wrong, and its
helpers (the time budget, the batch that fits, the FLOPs of a LoRA step) do what they say."""

import json
import math
from pathlib import Path

import pytest
import torch

from minipaligemma import PaliGemma, gemma, get_config
from minipaligemma.__main__ import main
from minipaligemma.bench import cases
from minipaligemma.gpu_bench import Report, largest_fitting, padded_batch, prefill_checks, decode_checks
from minipaligemma.lora import DEFAULT_TARGETS, add_lora
from minipaligemma.measure import lora_train_flops, random_model

# As in test_attention_paths: past 8 compiled shapes torch would run flex_attention uncompiled
# with this warning, and the figures would be another path's.
pytestmark = pytest.mark.filterwarnings("error:.*flex_attention called without torch.compile")

CHECKS = ["prefill flex vs eager", "prefill sdpa vs eager, no soft-cap", "decode flex (flex attention) vs eager",
          "decode compiled (flex attention) vs eager"]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_the_gpu_check_runs_on_a_cpu_at_tiny_sizes(capsys, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # its files go to runs/gpu-bench/ under the working folder
    assert main(["bench", "--config", "gpu", "--device", "cpu", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["command"] == "python -m minipaligemma bench --config gpu --device cpu --threads 1"
    # Every row was printed as it was measured, stamped, before the table, in the parts' order.
    table_start = next(i for i, line in enumerate(lines) if line.startswith("minipaligemma bench"))
    rows = lines[:table_start]
    assert all(line.startswith("[") for line in rows)
    firsts = [next(i for i, line in enumerate(rows) if f"] {part}" in line)
              for part in ("device", "checks / tiny float32", "checks / tiny-gemma1 float32", "prefill_ms / ours eager",
                           "decode / ours compiled", "train / tiny lora")]
    assert firsts == sorted(firsts)

    assert positive(report["device"]["copy_bandwidth_gb_s"]) and positive(report["device"]["matmul_tflops"])
    expected = {"tiny float32": CHECKS, "tiny bfloat16": CHECKS[:2],  # on a CPU decoding in float32 only
                "tiny-gemma1 float32": CHECKS[:2], "tiny-gemma1 bfloat16": CHECKS[:2]}  # PaliGemma 1: prefill only
    assert {group: list(checks) for group, checks in report["checks"].items()} == expected
    for group, checks in report["checks"].items():
        for name, check in checks.items():
            assert check["passed"] and 0 <= check["error"] <= check["tolerance"], (group, name)
    for who in ("ours eager", "ours flex", "transformers eager"):
        assert positive(report["prefill_ms"][who]["ms"]), who
    decode = report["decode"]
    for who in ("ours eager", "ours compiled", "ours compiled eager", "transformers eager"):
        row = decode[who]["b2"]
        assert positive(row["tok_s"]) and positive(row["mbu"]) and row["compile_s"] >= 0, who
    assert decode["ours compiled"]["b2"]["attention"] == "flex"
    static = decode["transformers static+compile"]["b2"]  # transformers 5.24 fails here (README)
    assert positive(static.get("tok_s")) or static["failed"]
    for name in ("tiny", "tiny lora"):
        train = report["train"][name]
        assert train["batch"] == 8 and positive(train["step_ms"]) and positive(train["mfu"]), name
    assert report["train"]["tiny lora"]["trainable"] < report["train"]["tiny"]["trainable"] / 5
    assert "skipped" not in json.dumps(report)  # no time limit on a CPU

    files = sorted((tmp_path / "runs" / "gpu-bench").iterdir())
    assert [f.suffix for f in files] == [".json", ".log"]
    saved = json.loads(files[0].read_text())
    assert saved["checks"] == report["checks"] and saved["train"] == report["train"]
    assert "train / tiny lora" in files[1].read_text()


def test_a_wrong_attention_path_fails_its_checks(capsys, tmp_path, monkeypatch):
    """flex_attention replaced by one that ignores its block mask (every query sees every key,
    padding and the later suffix too): the checks of the paths that run flex fail, sdpa's passes."""
    case = cases(torch.device("cpu"))["tiny"]

    def ignores_the_mask(q, k, v, score_mod, block_mask, scale, enable_gqa):
        everything = torch.ones(q.shape[0], q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
        return gemma.attend(q, k, v, everything, case.model.text.attn_softcap)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gemma, "compiled_flex_attention", lambda: ignores_the_mask)
    model = random_model(case.model, torch.float32).eval()
    x = padded_batch(case, torch.device("cpu"))
    report = Report("test", torch.device("cpu"), "", None)
    prefill_checks(report, ("tiny",), model, x, 1e-5)
    decode_checks(report, ("tiny",), model, x, case.new_tokens, 1e-5)
    checks = report.data["tiny"]
    assert [name for name, check in checks.items() if not check["passed"]] == [
        "prefill flex vs eager", "decode flex (flex attention) vs eager", "decode compiled (flex attention) vs eager"]
    assert checks["prefill flex vs eager"]["error"] > 1e-2
    out = capsys.readouterr().out
    assert out.count("FAILED") == 3 and out.count("  ok") == 1  # sdpa, the one right path


def test_a_part_out_of_time_is_skipped_and_a_failing_one_recorded(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = Report("test", torch.device("cpu"), "", {"late": 0.0})
    ran = []
    report.run_part("late", ("late", "row"), lambda: ran.append("late"))
    report.run_part("other", ("other", "row"), lambda: 1 / 0)
    report.run_part("other", ("other", "next"), lambda: ran.append("next"))
    assert ran == ["next"]  # the run goes on after a failure
    assert report.data["late"]["row"]["skipped"].startswith("late had no time left")
    assert report.data["other"]["row"] == {"failed": "ZeroDivisionError: division by zero"}
    assert "failed: ZeroDivisionError" in capsys.readouterr().out
    assert json.loads(Path(f"{report.stem}.json").read_text())["other"]["row"]["failed"]


def test_the_largest_batch_that_fits_is_found_past_out_of_memory():
    param = torch.nn.Parameter(torch.ones(3))
    tried = []

    def make_step(batch):
        def step():
            tried.append(batch)
            param.grad = torch.ones(3)  # a half-done step leaves gradients behind
            if batch > 16:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return step

    batch, step, too_big = largest_fitting((64, 32, 16, 8), make_step, [param])
    assert (batch, too_big, tried) == (16, [64, 32], [64, 32, 16])
    step()
    assert tried[-1] == 16
    with pytest.raises(torch.cuda.OutOfMemoryError):
        largest_fitting((64, 32), make_step, [param])


def test_a_lora_step_counts_forward_input_gradients_and_adapters():
    """Counted from the config's shapes: the image side forward only (2), the frozen decoder
    forward and input gradient (4), each adapter parameter 6."""
    cfg = get_config("tiny")
    with torch.device("meta"):
        model = add_lora(PaliGemma(cfg), rank=4, alpha=4, targets=DEFAULT_TARGETS)
    t = cfg.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    linears = [(t.width, q), (t.width, kv), (t.width, kv), (q, t.width),
               (t.width, t.mlp_dim), (t.width, t.mlp_dim), (t.mlp_dim, t.width)]  # (in, out) of one layer
    frozen = t.depth * (sum(i * o for i, o in linears) + 4 * t.width) + t.width  # + 4 norms a layer, final norm
    adapters = t.depth * sum(4 * (i + o) for i, o in linears)
    image_side = sum(p.numel() for p in [*model.vision.parameters(), *model.projector.parameters()])
    embedding = t.vocab_size * t.width
    image, text = cfg.num_image_tokens, 10
    expected = 3 * (2 * image_side * image + (4 * frozen + 6 * adapters) * (image + text) + 4 * embedding * text)
    assert lora_train_flops(model, batch=3, text_len=text) == expected
    model.vision.requires_grad_(True)
    with pytest.raises(ValueError, match="adapters on the decoder only"):
        lora_train_flops(model, batch=3, text_len=text)


def test_gpu_and_attention_configs_run_alone_and_measure_their_own(capsys):
    assert main(["bench", "--config", "gpu,tiny", "--device", "cpu"]) == 2
    assert "--config gpu and --config attention run alone" in capsys.readouterr().err
    assert main(["bench", "--config", "attention", "--repeats", "2"]) == 2
    assert "--repeats: not an option of --config attention" in capsys.readouterr().err
