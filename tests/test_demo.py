"""forgetkern demo's pipeline on the real SmolLM2 (a reduced configuration, so the suite stays in budget)."""

import json

import pytest

from forgetkern import demo
from forgetkern.testing.models import ModelUnavailable


@pytest.mark.slow
def test_demo_pipeline_on_smollm2(tmp_path):
    cfg = dict(demo.QUICK, seeds=(0,), task_windows=16, eval_windows=4, naive_lrs=(1e-3,), checkpoints=(1, 2),
               methods=("naive", "replay", "lwf"))
    try:
        report, files = demo.run(cfg, tmp_path, progress=False, log=lambda *a: None)
    except ModelUnavailable as e:
        pytest.skip(str(e))
    methods = {r.method for r in report.runs}
    assert methods == {"naive", "replay", "lwf"}
    assert all(r.steps in (1, 2) for r in report.runs) and len(report.runs) == 6
    naive = [r for r in report.runs if r.method == "naive"]
    assert naive[-1].task_gain > 0  # two LoRA steps at lr 1e-3 on code already lower the code perplexity
    data = json.loads(files["json"].read_text())
    assert data["meta"]["comparison"][0]["method"] == "naive (best)"
    assert files["plot"].stat().st_size > 1000 and "| naive |" in files["markdown"].read_text()


def test_equal_gain_interpolation():
    pts = [(0.0, 0.0), (0.1, 0.02), (0.3, 0.10)]
    assert demo.equal_gain_drop(pts, 0.2) == pytest.approx(0.06)
    assert demo.equal_gain_drop(pts, 0.3) == pytest.approx(0.10)
    assert demo.equal_gain_drop(pts, 0.5) is None


def test_cli_rejects_unknown_method():
    with pytest.raises(SystemExit):
        demo.main(["--methods", "naive,nope"])
