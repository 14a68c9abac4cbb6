"""build_engines.py: the exported tiny step runs in onnxruntime with torch's numbers; the cache is written whole."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

import build_engines as be
from engine.config import get_preset
from kernels.graphs import StepShape


def test_export_step_equals_model_forward():
    cfg = get_preset("tiny").dit
    shape = StepShape(1, 2, 4, 4)
    model = be.random_model(cfg, "cpu", torch.float32)
    (context, clip_fea, y), (x, t, emo, ip) = be.example_session(cfg, shape, "cpu", torch.float32)
    step = be.ExportStep(model, shape, context, clip_fea, y)
    with torch.no_grad():
        torch.testing.assert_close(step(x, t, emo, ip), model(x, t, context, clip_fea, y, emo, float(ip[0])),
                                   atol=1e-5, rtol=1e-5)


def test_tiny_onnx_export_matches_torch_in_onnxruntime(tmp_path):
    shape = StepShape(1, 3, 8, 8)
    logs = []
    meta = be.build("tiny", shape, torch.float32, "cpu", tmp_path, tensorrt=True, log=logs.append)
    folder = tmp_path / be.artifact_key("tiny", shape, torch.float32)
    assert meta["folder"] == str(folder)
    model = onnx.load(str(folder / "step.onnx"))
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == be.INPUT_NAMES
    check = meta["onnx_check"]
    assert check["ok"] and check["max_abs_diff"] < 1e-4 and check["max_abs_ref"] > 0.1
    assert json.loads((folder / "meta.json").read_text())["onnx_check"] == check
    # nothing half-written is left beside the finished folder
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("torch_tensorrt") is None:
        assert meta["built"]["tensorrt"] == be.TENSORRT_MISSING
        assert "pip install torch-tensorrt tensorrt" in be.TENSORRT_MISSING


def test_artifact_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with be.ArtifactDir(tmp_path, "tiny_x") as folder:
            (folder / "step.onnx").write_bytes(b"partial")
            raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []
    # a later build replaces the folder atomically and keeps files it does not rebuild
    with be.ArtifactDir(tmp_path, "tiny_x") as folder:
        (folder / "step.onnx").write_bytes(b"v1")
    with be.ArtifactDir(tmp_path, "tiny_x") as folder:
        (folder / "meta.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "tiny_x").iterdir()) == ["meta.json", "step.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny_x"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal on a machine without CUDA is what is tested")
def test_cli_rejects_inductor_on_cpu(capsys):
    with pytest.raises(SystemExit):
        be.main(["--inductor", "--device", "cpu"])
    assert "CUDA" in capsys.readouterr().err
