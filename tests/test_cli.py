"""The qpass command line: quantize (tiny models via python:module.fn), summary, export, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from qpass import cli
from qpass.cli_commands import load_config

from conftest import MLP, needs_minilm

HERE = os.path.dirname(__file__)


def tiny_mlp():
    """A --model python:test_cli.tiny_mlp factory: (model, calib batches)."""
    torch.manual_seed(0)
    return MLP().eval(), [torch.randn(4, 32) for _ in range(3)]


def tiny_untraceable():
    from test_model_quant import _DataDependent

    torch.manual_seed(0)
    return _DataDependent(), [torch.randn(2, 8)]


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


SPEC = f"python:{os.path.join(HERE, 'test_cli.py')}:tiny_mlp"


def test_quantize_python_model_saves_exports_and_reports(tmp_path, capsys):
    save, onnx = tmp_path / "m.qpass", tmp_path / "m.onnx"
    rc, out, err = _run(["quantize", "--model", SPEC, "--config", "INT8_DEFAULT_CFG",
                         "--save", str(save), "--export", str(onnx)], capsys)
    assert rc == 0, err
    assert "fc1.input_quantizer" in out  # the summary
    assert "mean cosine to FP32 outputs" in out
    cos = float(out.split("mean cosine to FP32 outputs ")[1].split()[0])
    assert 0.99 < cos <= 1.0
    assert f"saved: {save}" in out and f"onnx: {onnx}" in out
    assert save.stat().st_size > 0 and onnx.stat().st_size > 0

    rc, out, err = _run(["summary", str(save)], capsys)
    assert rc == 0 and "fc1.input_quantizer" in out and "int8 per-tensor" in out
    assert "6 quantizers: 4 enabled, 2 disabled" in out
    rc, out, _ = _run(["summary", str(save), "--json"], capsys)
    doc = json.loads(out)
    assert len(doc["quantizers"]) == 6 and doc["rule_set"] == "default"

    onnx2 = tmp_path / "again.onnx"
    rc, out, err = _run(["export", str(save), str(onnx2), "--model", SPEC], capsys)
    assert rc == 0, err
    assert onnx2.read_bytes() == onnx.read_bytes()  # restore + export is the same graph


def test_config_file_and_algorithm_override(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0},
                                             "*input_quantizer": {"enable": False}}, "algorithm": "max"}))
    rc, out, err = _run(["quantize", "--model", SPEC, "--config", str(cfg), "--no-save", "--no-export"], capsys)
    assert rc == 0, err
    assert "saved:" not in out and "onnx:" not in out
    assert load_config("INT8_DEFAULT_CFG", "smoothquant")["algorithm"] == "smoothquant"
    assert load_config("INT8_DEFAULT_CFG", '{"method": "smoothquant", "alpha": 0.5}')["algorithm"]["alpha"] == 0.5
    assert load_config("INT8_DEFAULT_CFG", None) == "INT8_DEFAULT_CFG"


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--config", "NOT_A_PRESET"], "unknown preset 'NOT_A_PRESET'"),
    (["quantize", "--model", "python:nosuchmodule_xyz.f"], "cannot import 'nosuchmodule_xyz'"),
    (["quantize", "--model", "/nonexistent/dir"], "expected minilm, smollm2"),
    (["quantize", "--model", SPEC, "--config", "/nonexistent.json"], "cannot read --config"),
    (["summary", "/nonexistent.qpass"], "cannot read qpass checkpoint"),
    (["quantize", "--model", f"python:{os.path.join(HERE, 'test_cli.py')}:tiny_untraceable", "--no-save",
      "--no-export", "--capture", "export"], "torch.export could not trace the model"),
])
def test_errors_are_one_line_without_traceback(argv, message, capsys, tmp_path):
    rc, out, err = _run(argv, capsys)
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("qpass: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_bad_json_config_and_debug_shows_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, _, err = _run(["quantize", "--model", SPEC, "--config", str(bad)], capsys)
    assert rc == 1 and "is not valid JSON" in err
    with pytest.raises(Exception):
        cli.main(["--debug", "quantize", "--model", SPEC, "--config", str(bad)])


def test_summary_of_a_damaged_file(tmp_path, capsys):
    p = tmp_path / "x.qpass"
    p.write_bytes(b"\x00" * 100)
    rc, _, err = _run(["summary", str(p)], capsys)
    assert rc == 1 and "not a valid qpass checkpoint" in err


def test_auto_quantize_missing_is_a_clear_error(capsys, monkeypatch):
    import qpass

    monkeypatch.delattr(qpass, "auto_quantize", raising=False)
    rc, _, err = _run(["auto-quantize", "--model", SPEC], capsys)
    assert rc == 1 and "not available in this version" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--rules", "bogus"])
    assert e.value.code == 2


def test_bench_without_tools_is_a_clear_error(capsys, monkeypatch):
    from qpass import cli_commands

    monkeypatch.setattr(cli_commands, "_tools_dir", lambda: None)
    rc, _, err = _run(["bench"], capsys)
    assert rc == 1 and "tools/bench.py" in err


def test_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "qpass.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "quantize" in r.stdout and "summary" in r.stdout


@needs_minilm
@pytest.mark.real_model
@pytest.mark.slow
def test_quickstart_minilm_defaults(tmp_path):
    """The README's first command: summary, accuracy and the paths of out/minilm.qpass and out/minilm.onnx."""
    r = subprocess.run([sys.executable, "-m", "qpass.cli", "quantize", "--model", "minilm",
                        "--calib-samples", "16", "--eval-samples", "16"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "encoder.layer.0.attention.self.query.input_quantizer" in r.stdout
    cos = float(r.stdout.split("mean cosine to FP32 embeddings ")[1].split()[0])
    assert cos > 0.99
    assert "saved: out/minilm.qpass" in r.stdout and "onnx: out/minilm.onnx" in r.stdout
    assert (tmp_path / "out" / "minilm.qpass").exists() and (tmp_path / "out" / "minilm.onnx").exists()


def test_auto_quantize_runs_when_available(tmp_path, capsys):
    import qpass

    if not callable(getattr(qpass, "auto_quantize", None)):
        pytest.skip("qpass.auto_quantize is not in this version")
    save = tmp_path / "a.qpass"
    rc, out, err = _run(["auto-quantize", "--model", SPEC, "--effective-bits", "6",
                         "--formats", "FP8_DEFAULT_CFG,INT4_AWQ_CFG", "--save", str(save),
                         "--report", str(tmp_path / "heat.png")], capsys)
    assert rc == 0, err
    assert "mean cosine to FP32 outputs" in out and save.exists()
    assert "layer group" in out and "effective bits" in out and (tmp_path / "heat.png").stat().st_size > 1000
